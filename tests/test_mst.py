"""decode_mst: exact single-root maximum spanning trees, checked against brute force."""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np
import pytest

from subnets.models.mst import decode_mst, tree_score


def find_cycle(heads) -> list[int] | None:
    """A cycle among words 1..n of ``heads`` (heads[0] ignored), or None."""
    n = len(heads) - 1
    for start in range(1, n + 1):
        seen, node = [], start
        while node != 0 and node not in seen:
            if not 0 <= heads[node] <= n:
                raise AssertionError(f"head {heads[node]} of word {node} out of range")
            seen.append(node)
            node = heads[node]
        if node != 0:
            return seen[seen.index(node) :]
    return None


def tree_problems(heads, n: int) -> list[str]:
    """Why ``heads`` is not a single-root dependency tree over n words (empty if it is one)."""
    heads = [int(h) for h in heads]
    problems = []
    if len(heads) != n + 1:
        return [f"length {len(heads)} != {n + 1}"]
    if heads[0] != -1:
        problems.append(f"heads[0] = {heads[0]}, expected -1")
    for d in range(1, n + 1):
        if not 0 <= heads[d] <= n:
            return [*problems, f"word {d} has head {heads[d]} outside 0..{n}"]
        if heads[d] == d:
            problems.append(f"word {d} is its own head")
    roots = [d for d in range(1, n + 1) if heads[d] == 0]
    if len(roots) != 1:
        problems.append(f"{len(roots)} words attached to the root: {roots}")
    if not any("own head" in p for p in problems) and find_cycle(heads) is not None:
        problems.append(f"cycle {find_cycle(heads)}")
    return problems


def assert_tree(heads, n: int) -> None:
    problems = tree_problems(heads, n)
    assert not problems, f"{list(heads)} is not a single-root tree: {problems}"


@cache
def all_trees(n: int) -> np.ndarray:
    """Every single-root tree over n words, as rows of heads (heads[0] = -1)."""
    trees = []
    for choice in itertools.product(range(n + 1), repeat=n):
        heads = (-1, *choice)
        if any(heads[d] == d for d in range(1, n + 1)):
            continue
        if sum(h == 0 for h in choice) != 1 or find_cycle(heads) is not None:
            continue
        trees.append(heads)
    return np.array(trees, dtype=np.int64)


def brute_force(scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Best single-root tree score and the scores of all trees (same order as all_trees)."""
    n = len(scores) - 1
    trees = all_trees(n)
    words = np.arange(1, n + 1)
    totals = scores[words, trees[:, 1:]].sum(axis=1)
    return float(totals.max()), totals


def greedy(scores: np.ndarray) -> np.ndarray:
    """Row-wise argmax heads (no self-loops), unconstrained."""
    s = np.array(scores, dtype=np.float64)
    np.fill_diagonal(s, -np.inf)
    heads = s.argmax(axis=1)
    heads[0] = -1
    return heads


def greedy_repair(scores: np.ndarray) -> np.ndarray:
    """Greedy heads, then forced into a single-root tree (a simple baseline, not optimal)."""
    s = np.array(scores, dtype=np.float64)
    np.fill_diagonal(s, -np.inf)
    n = len(s) - 1
    heads = greedy(s)
    roots = [d for d in range(1, n + 1) if heads[d] == 0]
    if len(roots) > 1:
        keep = max(roots, key=lambda d: s[d, 0])
        for d in roots:
            if d != keep:
                heads[d] = 1 + int(s[d, 1:].argmax())  # best non-root head (diagonal is -inf)
    while (cycle := find_cycle(heads)) is not None:
        reaching = {0}
        for d in range(1, n + 1):
            chain, node = set(), d
            while node != 0 and node not in chain:
                chain.add(node)
                node = heads[node]
            if node == 0:
                reaching.add(d)
        has_root_child = any(heads[d] == 0 for d in range(1, n + 1))
        allowed = [h for h in sorted(reaching) if h != 0 or not has_root_child]
        _, c, h = max((s[c, h], c, h) for c in cycle for h in allowed)
        heads[c] = h
    return heads


def random_matrices(count: int = 360, seed: int = 20240611):
    """Random [n+1, n+1] score matrices, n = 1..6, several scales, some with many ties."""
    rng = np.random.default_rng(seed)
    scales = (0.01, 1.0, 5.0, 100.0)
    for k in range(count):
        n = 1 + k % 6
        scale = scales[(k // 6) % len(scales)]
        scores = rng.normal(size=(n + 1, n + 1)) * scale
        tied = k % 3 == 2
        if tied:
            scores = np.round(scores / scale)  # integer scores: many ties
        yield n, scores, tied


def test_mst_is_the_best_single_root_tree_by_brute_force():
    checked = 0
    for n, scores, _ in random_matrices():
        heads = decode_mst(scores)
        assert_tree(heads, n)
        best, _ = brute_force(scores)
        assert tree_score(scores, heads) == pytest.approx(best, abs=1e-9, rel=0), (n, scores)
        checked += 1
    assert checked == 360


def test_brute_force_enumeration_counts_single_root_trees():
    # Single-root trees over n labelled words: n choices of root child times n^(n-2) trees.
    for n in range(1, 7):
        expected = 1 if n == 1 else n * n ** (n - 2)
        assert len(all_trees(n)) == expected


def test_mst_does_not_modify_its_input():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(6, 6))
    before = scores.copy()
    decode_mst(scores)
    np.testing.assert_array_equal(scores, before)


def test_mst_matches_greedy_when_greedy_is_a_tree_and_beats_repaired_greedy_otherwise():
    greedy_trees = greedy_invalid = repaired_worse = 0
    for n, scores, tied in random_matrices(seed=7):
        mst = decode_mst(scores)
        assert_tree(mst, n)
        plain = greedy(scores)
        if not tree_problems(plain, n):
            greedy_trees += 1
            if tied:
                # Several trees may share the best score; the MST must reach it.
                assert tree_score(scores, mst) == pytest.approx(tree_score(scores, plain), abs=1e-9)
            else:
                np.testing.assert_array_equal(mst, plain)
        else:
            greedy_invalid += 1
            repaired = greedy_repair(scores)
            assert_tree(repaired, n)
            assert tree_score(scores, mst) >= tree_score(scores, repaired) - 1e-9
            if tree_score(scores, mst) > tree_score(scores, repaired) + 1e-9:
                repaired_worse += 1
    # The comparison is meaningful: greedy alone often fails, sometimes succeeds, and the
    # repaired greedy tree is sometimes strictly worse than the MST.
    assert greedy_invalid > 0
    assert greedy_trees > 0
    assert repaired_worse > 0


def test_two_words_preferring_the_root_get_exactly_one_root_child():
    # Words 1 and 2 both prefer the root strongly; the unconstrained best arborescence would
    # attach both to 0. Best single-root tree: 1 -> 0 (10), 2 -> 1 (3), 3 -> 2 (1): 14, versus
    # 2 -> 0 (9), 1 -> 2 (2), 3 -> 2 (1): 12.
    scores = np.full((4, 4), -5.0)
    scores[1, 0], scores[2, 0] = 10.0, 9.0
    scores[2, 1], scores[1, 2] = 3.0, 2.0
    scores[3, 2], scores[3, 1], scores[3, 0] = 1.0, 0.5, 0.0
    unconstrained = greedy(scores)
    assert [int(unconstrained[d]) for d in (1, 2)] == [0, 0]  # two root arcs

    best, totals = brute_force(scores)
    expected = all_trees(3)[int(totals.argmax())]
    assert (totals == best).sum() == 1  # unique optimum
    assert list(expected) == [-1, 0, 1, 2]

    heads = decode_mst(scores)
    assert_tree(heads, 3)
    assert [int(h) for h in heads] == [-1, 0, 1, 2]
    assert tree_score(scores, heads) == pytest.approx(14.0)


def test_root_child_choice_trades_off_against_the_rest_of_the_tree():
    # Word 1 prefers the root more than word 2, but attaching 2 to the root lets 1 take a much
    # better head: 2 -> 0 (8) + 1 -> 2 (6) = 14 beats 1 -> 0 (10) + 2 -> 1 (0) = 10.
    scores = np.zeros((3, 3))
    scores[1, 0], scores[2, 0] = 10.0, 8.0
    scores[1, 2], scores[2, 1] = 6.0, 0.0
    heads = decode_mst(scores)
    assert [int(h) for h in heads] == [-1, 2, 0]


def test_single_word_attaches_to_root():
    heads = decode_mst(np.array([[0.0, 0.0], [-3.0, 0.0]]))
    assert [int(h) for h in heads] == [-1, 0]


def test_large_random_matrix_gives_a_valid_tree():
    rng = np.random.default_rng(11)
    n = 60
    scores = rng.normal(size=(n + 1, n + 1)) * 3.0
    heads = decode_mst(scores)
    assert heads.shape == (n + 1,)
    assert_tree(heads, n)
    # Many words would prefer the root: make sure the constraint still holds.
    scores[1:, 0] += 10.0
    assert sum(greedy(scores)[1:] == 0) > 1
    heads = decode_mst(scores)
    assert_tree(heads, n)


@pytest.mark.parametrize(
    "shape",
    [(3, 4), (4, 3), (1, 1), (0, 0), (3,), (2, 2, 2)],
    ids=["3x4", "4x3", "1x1", "0x0", "vector", "3d"],
)
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        decode_mst(np.zeros(shape))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cell", [(1, 0), (2, 1), (1, 3), (3, 2)])
def test_non_finite_word_scores_raise(value, cell):
    scores = np.random.default_rng(0).normal(size=(4, 4))
    scores[cell] = value
    with pytest.raises(ValueError, match="finite"):
        decode_mst(scores)


def test_diagonal_and_root_row_are_ignored():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(5, 5))
    expected = decode_mst(scores)
    assert_tree(expected, 4)

    noisy = scores.copy()
    np.fill_diagonal(noisy, -np.inf)
    noisy[0] = [np.nan, np.inf, -np.inf, 1e6, np.nan]
    heads = decode_mst(noisy)
    np.testing.assert_array_equal(heads, expected)

    # A huge self-loop score must not be chosen either.
    loops = scores.copy()
    np.fill_diagonal(loops, 1e9)
    np.testing.assert_array_equal(decode_mst(loops), expected)
