"""Support sentences of an unseen language: where they come from and how they are drawn.

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
    found = {}
    for split in SPLITS:
        if split not in treebank.files:
            continue
        found[split] = (
            sizes[split] if sizes and split in sizes else len(load_language(treebank, split).sentences)
        )
        if found[split] >= k:
            return split
    listed = ", ".join(f"{split} ({n} sentences)" for split, n in found.items()) or "none"
    raise ValueError(
        f"{treebank.code}: no split holds k={k} sentences for few-shot support (fewshot.k); splits: {listed} "
        "(languages.max_eval_sentences, if set, caps the evaluated split)"
    )


def check_support(treebank: TreebankFiles, evaluated: LanguageData, k: int) -> str:
    """The split ``k`` support sentences for ``evaluated``'s language come from; raises if
    drawing them from the evaluated split itself would leave nothing to score."""
    split = support_split(treebank, k, {evaluated.split: len(evaluated)})
    if split == evaluated.split and len(evaluated) <= k:
        raise ValueError(
            f"{treebank.code}: the k={k} few-shot support sentences (fewshot.k) come from its {split} "
            f"split, which is also the one scored, and it holds only {len(evaluated)} sentences: none "
            "would be left to score (lower fewshot.k, or raise languages.max_eval_sentences if set)"
        )
    return split


def draw_support(
    treebank: TreebankFiles, evaluated: LanguageData, k: int, seed: int, on_error: str = "raise"
) -> tuple[LanguageData, LanguageData]:
    """Draw ``k`` support sentences for ``evaluated``'s language; returns (support, evaluated
    data without the support sentences). Deterministic for (seed, language)."""
    split = check_support(treebank, evaluated, k)
    pool = evaluated if split == evaluated.split else load_language(treebank, split, on_error)
    rng = np.random.default_rng([seed, zlib.crc32(treebank.code.encode())])
    chosen = sorted(int(i) for i in rng.choice(len(pool), size=k, replace=False))
    support = pool.subset(chosen, split)
    if pool is not evaluated:
        return support, evaluated
    taken = set(chosen)
    return support, evaluated.subset([i for i in range(len(evaluated)) if i not in taken])
