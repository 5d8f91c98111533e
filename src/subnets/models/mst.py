"""Maximum spanning tree decoding (Chu-Liu-Edmonds) with exactly one root.

Scores follow the parser's convention ``scores[d, h]``: the score of word ``h`` being the head
of word ``d``; node 0 is the artificial root. The single-root constraint is exact: every arc
from the root is penalised by a constant larger than any score difference a second root could
gain, so the best arborescence uses exactly one root arc and, among those, has the highest
original score (Gabow and Tarjan's reduction).
"""

from __future__ import annotations

import numpy as np


def tree_score(scores: np.ndarray, heads: np.ndarray) -> float:
    """Sum of ``scores[d, heads[d]]`` over the words ``d >= 1``."""
    words = np.arange(1, len(heads))
    return float(scores[words, heads[1:]].sum())


def decode_mst(scores: np.ndarray) -> np.ndarray:
    """Heads of the highest-scoring dependency tree with exactly one word attached to the root.

    Args:
        scores: ``[n + 1, n + 1]`` finite arc scores, ``scores[d, h]`` for head ``h`` of word ``d``
            (row 0 and the diagonal are ignored).

    Returns:
        ``heads`` of length ``n + 1`` with ``heads[0] = -1`` and ``heads[d]`` in ``0..n``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    size = scores.shape[0] if scores.ndim else 0
    if scores.shape != (size, size) or size < 2:
        raise ValueError(f"scores must be a square [n+1, n+1] matrix with n >= 1, got {scores.shape}")
    scores = scores.copy()
    np.fill_diagonal(scores, 0.0)
    words = scores[1:]
    if not np.isfinite(words).all():
        raise ValueError("arc scores must be finite (off the diagonal, for words 1..n)")
    penalty = (size - 1) * (words.max() - words.min()) + 1.0
    scores[1:, 0] -= penalty
    return _chu_liu_edmonds(scores)


def _chu_liu_edmonds(scores: np.ndarray) -> np.ndarray:
    size = len(scores)
    scores = scores.copy()
    np.fill_diagonal(scores, -np.inf)
    scores[0] = -np.inf
    heads = scores.argmax(axis=1)
    heads[0] = -1
    cycle = _find_cycle(heads)
    if cycle is None:
        return heads

    # Contract the cycle into one node (index m of the smaller graph) and solve that graph.
    in_cycle = np.zeros(size, dtype=bool)
    in_cycle[cycle] = True
    rest = np.flatnonzero(~in_cycle)  # rest[0] == 0: the root is never on a cycle
    cycle = np.asarray(cycle)
    m = len(rest)
    contracted = np.full((m + 1, m + 1), -np.inf)
    contracted[:m, :m] = scores[np.ix_(rest, rest)]
    # Entering the cycle at node d replaces d's cycle arc: gain relative to that arc.
    entering = scores[np.ix_(cycle, rest)] - scores[cycle, heads[cycle]][:, None]
    contracted[m, :m] = entering.max(axis=0)
    leaving = scores[np.ix_(rest, cycle)]
    contracted[:m, m] = leaving.max(axis=1)
    sub = _chu_liu_edmonds(contracted)

    result = heads.copy()
    for i in range(1, m):
        h = sub[i]
        result[rest[i]] = cycle[leaving[i].argmax()] if h == m else rest[h]
    external = sub[m]
    result[cycle[entering[:, external].argmax()]] = rest[external]
    return result


def _find_cycle(heads: np.ndarray) -> list[int] | None:
    """A cycle in the head graph (node 0 has no head), or None."""
    state = np.zeros(len(heads), dtype=np.int8)  # 0 new, 1 on current path, 2 done
    state[0] = 2
    for start in range(1, len(heads)):
        path, node = [], start
        while state[node] == 0:
            state[node] = 1
            path.append(node)
            node = heads[node]
        if state[node] == 1:
            return path[path.index(node) :]
        state[path] = 2
    return None
