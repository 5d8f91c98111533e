"""Temperature sampling over languages and language-homogeneous batches (subnets.data.sampling)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from subnets.data.sampling import LanguageSampler, language_probabilities


@pytest.mark.parametrize(
    ("alpha", "expected_a"),
    [
        (0.0, 1 / 2),  # uniform
        (0.5, 10 / (10 + 20)),  # sqrt(100) = 10, sqrt(400) = 20
        (1.0, 100 / (100 + 400)),  # proportional to size
    ],
)
def test_probabilities_by_hand(alpha, expected_a):
    p = language_probabilities({"a": 100, "b": 400}, alpha)
    assert list(p) == ["a", "b"]
    assert p["a"] == pytest.approx(expected_a)
    assert p["b"] == pytest.approx(1 - expected_a)
    assert sum(p.values()) == pytest.approx(1.0)


def test_probabilities_match_the_formula_for_several_languages():
    sizes = {"en": 12000, "de": 3000, "ko": 250, "tiny": 7}
    for alpha in (0.0, 0.3, 0.7, 1.0):
        weights = {c: n**alpha for c, n in sizes.items()}
        total = sum(weights.values())
        p = language_probabilities(sizes, alpha)
        for code in sizes:
            assert p[code] == pytest.approx(weights[code] / total)
    # a smaller alpha flattens the distribution
    assert language_probabilities(sizes, 0.3)["tiny"] > language_probabilities(sizes, 0.7)["tiny"]


@pytest.mark.parametrize("sizes", [{"a": 100, "b": 0}, {"a": 5, "b": -1}, {}])
def test_empty_languages_are_rejected(sizes):
    with pytest.raises(ValueError) as info:
        language_probabilities(sizes, 0.5)
    if sizes:
        assert "b" in str(info.value)
    with pytest.raises(ValueError):
        LanguageSampler(sizes, batch_size=4)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        LanguageSampler({"a": 10}, batch_size=0)


SIZES = {"big": 103, "exact": 32, "small": 5, "one": 1, "odd": 17}


def test_batches_are_valid_for_each_language():
    sampler = LanguageSampler(SIZES, batch_size=8, alpha=0.0, seed=3)
    seen = Counter()
    for _ in range(2000):
        code, indices = sampler.next()
        n = SIZES[code]
        assert code in SIZES
        assert len(indices) == min(8, n)
        assert len(set(indices)) == len(indices)
        assert all(isinstance(i, int) and 0 <= i < n for i in indices)
        seen[code] += 1
    assert set(seen) == set(SIZES)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (17, 8), (32, 8), (5, 8), (1, 3), (9, 9), (100, 7)])
def test_each_epoch_is_a_permutation(n, batch_size):
    """Cut the stream of one language's indices into chunks of n: each chunk holds every sentence once."""
    sampler = LanguageSampler({"l": n}, batch_size=batch_size, seed=11)
    stream = []
    epochs = 6
    while len(stream) < epochs * n:
        batch = sampler.next_batch("l")
        assert len(batch) == min(batch_size, n)
        assert len(set(batch)) == len(batch)
        stream.extend(batch)
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n)), f"epoch {e}"
    # the epochs are reshuffled, not repeated
    if n > 3:
        chunks = {tuple(stream[e * n : (e + 1) * n]) for e in range(epochs)}
        assert len(chunks) > 1


def test_first_ceil_n_over_batch_batches_cover_the_language():
    n, batch_size = 10, 4
    sampler = LanguageSampler({"a": 50, "l": n}, batch_size=batch_size, seed=0)
    batches = [sampler.next_batch("l") for _ in range(math.ceil(n / batch_size))]
    drawn = [i for batch in batches for i in batch]
    assert len(drawn) == 12
    assert sorted(drawn[:n]) == list(range(n))
    assert all(len(set(b)) == batch_size for b in batches)


def draws(sampler, count):
    return [sampler.next() for _ in range(count)]


def test_same_seed_same_sequence_other_seed_other_sequence():
    a = draws(LanguageSampler(SIZES, batch_size=6, alpha=0.5, seed=42), 300)
    b = draws(LanguageSampler(SIZES, batch_size=6, alpha=0.5, seed=42), 300)
    c = draws(LanguageSampler(SIZES, batch_size=6, alpha=0.5, seed=43), 300)
    assert a == b
    assert a != c
    assert [code for code, _ in a] != [code for code, _ in c]


def test_empirical_language_frequencies_match_the_probabilities():
    sizes = {"en": 5000, "de": 1200, "ko": 300, "xx": 40}
    sampler = LanguageSampler(sizes, batch_size=16, alpha=0.5, seed=9)
    counts = Counter(sampler.next_language() for _ in range(20000))
    for code, p in sampler.probabilities.items():
        assert counts[code] / 20000 == pytest.approx(p, abs=0.02), code
    # alpha really changes what is drawn: uniform sampling gives "xx" about a quarter of the draws
    uniform = LanguageSampler(sizes, batch_size=16, alpha=0.0, seed=9)
    xx = sum(uniform.next_language() == "xx" for _ in range(20000)) / 20000
    assert xx == pytest.approx(0.25, abs=0.02)


def test_state_dict_resumes_exactly_after_a_json_round_trip():
    settings = {"sizes": SIZES, "batch_size": 6, "alpha": 0.7, "seed": 5}
    sampler = LanguageSampler(**settings)
    draws(sampler, 37)
    saved = json.dumps(sampler.state_dict())
    expected = draws(sampler, 20)

    fresh = LanguageSampler(**settings)
    fresh.load_state_dict(json.loads(saved))
    assert draws(fresh, 20) == expected

    # a fresh sampler that does not load the state starts over and draws something else
    assert draws(LanguageSampler(**settings), 20) != expected
    # loading the same state again replays the same draws
    fresh.load_state_dict(json.loads(saved))
    assert draws(fresh, 20) == expected


def test_state_dict_is_a_snapshot():
    sampler = LanguageSampler({"a": 9, "b": 4}, batch_size=4, seed=1)
    draws(sampler, 5)
    state = sampler.state_dict()
    copy = json.loads(json.dumps(state))
    draws(sampler, 10)
    assert json.loads(json.dumps(state)) == copy


def test_state_for_other_languages_is_rejected():
    state = LanguageSampler({"a": 10, "b": 20}, batch_size=4).state_dict()
    for sizes in ({"a": 10}, {"a": 10, "c": 20}, {"a": 10, "b": 20, "c": 5}):
        sampler = LanguageSampler(sizes, batch_size=4)
        before = json.dumps(sampler.state_dict())
        with pytest.raises(ValueError, match="languages"):
            sampler.load_state_dict(json.loads(json.dumps(state)))
        assert json.dumps(sampler.state_dict()) == before  # nothing was loaded


def test_sampler_uses_language_probabilities():
    sampler = LanguageSampler({"a": 100, "b": 400}, batch_size=4, alpha=1.0, seed=0)
    assert sampler.codes == ["a", "b"]
    assert np.allclose([sampler.probabilities[c] for c in sampler.codes], [0.2, 0.8])
    counts = Counter(sampler.next_language() for _ in range(5000))
    assert counts["b"] / 5000 == pytest.approx(0.8, abs=0.03)
