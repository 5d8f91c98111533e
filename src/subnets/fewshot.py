"""Support sentences for unseen languages (the few-shot protocol's sampling rule).

``k`` support sentences of a language come from its train split, else its dev split, else its
test file: the first of these that holds at least ``k`` sentences. When they come from the
split being evaluated, they are removed from it, so a support sentence is never scored.
"""

from __future__ import annotations

import zlib

import numpy as np

from subnets.data.dataset import LanguageData, load_language
from subnets.data.ud import SPLITS, TreebankFiles


def support_split(treebank: TreebankFiles, k: int, sizes: dict[str, int] | None = None) -> str:
    """The split support sentences are drawn from: train, else dev, else test, the first with
    at least ``k`` sentences (``sizes`` gives split sizes when known; else files are read)."""
    for split in SPLITS:
        if split not in treebank.files:
            continue
        size = sizes[split] if sizes and split in sizes else len(load_language(treebank, split).sentences)
        if size >= k:
            return split
    raise ValueError(
        f"{treebank.code}: no split holds k={k} sentences for few-shot support (fewshot.k); "
        f"splits: {', '.join(treebank.files) or 'none'}"
    )


def draw_support(
    treebank: TreebankFiles, evaluated: LanguageData, k: int, seed: int, on_error: str = "raise"
) -> tuple[LanguageData, LanguageData]:
    """Draw ``k`` support sentences for ``evaluated``'s language; returns (support, evaluated
    data without the support sentences). Deterministic for (seed, language)."""
    sizes = {evaluated.split: len(evaluated)}
    split = support_split(treebank, k, sizes)
    pool = evaluated if split == evaluated.split else load_language(treebank, split, on_error)
    rng = np.random.default_rng([seed, zlib.crc32(treebank.code.encode())])
    chosen = sorted(int(i) for i in rng.choice(len(pool), size=k, replace=False))
    support = pool.subset(chosen, split)
    if pool is not evaluated:
        return support, evaluated
    taken = set(chosen)
    return support, evaluated.subset([i for i in range(len(evaluated)) if i not in taken])
