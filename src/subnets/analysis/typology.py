"""Typological similarity between languages from URIEL (Littell et al. 2017), and its correlation
with subnetwork overlap.

The URIEL vectors are read from the data files that the ``lang2vec`` package ships (offline);
its module itself is not imported, because it needs ``pkg_resources``, which recent setuptools
no longer provides. Similarity is the cosine similarity of the ``syntax_knn`` vectors (103 WALS/
SSWL/Ethnologue syntax features, missing values predicted from the nearest languages), i.e.
1 - URIEL's syntactic distance.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import numpy as np


@cache
def _uriel() -> tuple[dict[str, int], np.ndarray, dict[str, str]]:
    folder = resources.files("lang2vec") / "data"
    with resources.as_file(folder / "feature_predictions.npz") as path:
        data = np.load(path, allow_pickle=True)
        languages = {str(code): i for i, code in enumerate(data["langs"])}
        syntax = np.array([str(f).startswith("S_") for f in data["feats"]])
        vectors = data["data"][:, syntax, 0].astype(np.float64)
    letters = json.loads((folder / "letter_codes.json").read_text())
    return languages, vectors, letters


def uriel_code(code: str) -> str | None:
    """The ISO 639-3 code URIEL knows for a treebank code (``en_ewt`` -> ``eng``,
    ``bxr_bdt`` -> ``bxr``), or None."""
    languages, _, letters = _uriel()
    iso = code.split("_")[0].lower()
    iso = letters.get(iso, iso)
    return iso if iso in languages else None


def typological_similarity(codes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``codes`` and the matrix of cosine similarities of their URIEL ``syntax_knn`` vectors.
    Raises ValueError naming the codes URIEL does not know."""
    unknown = [c for c in codes if uriel_code(c) is None]
    if unknown:
        raise ValueError(
            f"no URIEL (lang2vec) entry for {', '.join(unknown)}: name treebanks by ISO 639 code"
        )
    languages, vectors, _ = _uriel()
    rows = np.stack([vectors[languages[uriel_code(c)]] for c in codes])
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return list(codes), unit @ unit.T


def overlap_typology_correlation(
    languages: Sequence[str],
    overlap: np.ndarray,
    similarity: np.ndarray,
    permutations: int = 9999,
    seed: int = 0,
) -> dict[str, Any]:
    """Spearman correlation between two symmetric language x language matrices over the distinct
    pairs, with a Mantel permutation test (languages relabelled, both tails; exact when there are
    at most ``permutations`` relabellings), since the pairs share languages and are not independent.

    Returns ``{"test", "rho", "p", "pairs", "permutations"}``; rho and p are NaN when either
    matrix is constant over the pairs.
    """
    from scipy import stats  # here: importing scipy.stats costs every command half a second

    n = len(languages)
    if n < 3:
        raise ValueError(f"need at least 3 languages for a correlation over pairs, got {n}")
    upper = np.triu_indices(n, k=1)
    overlap, similarity = np.asarray(overlap, dtype=float), np.asarray(similarity, dtype=float)
    rho = float(stats.spearmanr(overlap[upper], similarity[upper]).statistic)
    if not np.isfinite(rho):  # one of the two is constant over the pairs
        return {"test": "Spearman, Mantel permutation", "rho": float("nan"), "p": float("nan"),
                "pairs": len(upper[0]), "permutations": 0}  # fmt: skip
    if math.factorial(n) <= permutations:
        orders = [np.array(p) for p in itertools.permutations(range(n))]
    else:
        rng = np.random.default_rng(seed)
        orders = [np.arange(n)] + [rng.permutation(n) for _ in range(permutations)]
    values = np.array(
        [
            stats.spearmanr(overlap[upper], similarity[np.ix_(order, order)][upper]).statistic
            for order in orders
        ]
    )
    p = float(np.mean(np.abs(values) >= abs(rho) - 1e-12))
    return {"test": "Spearman, Mantel permutation", "rho": rho, "p": p, "pairs": len(upper[0]),
            "permutations": len(orders)}  # fmt: skip
