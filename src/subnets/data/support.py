"""Support examples of an unseen language: where they come from and how they are drawn, the
same for every task.

``k`` support examples of a language come from its train split, else its dev split, else its
test file: the first of these that holds at least ``k`` examples. When they come from the
split being evaluated, they are removed from it, so a support example is never scored.
"""

from __future__ import annotations

import zlib

import numpy as np

from subnets.data.cache import DataCache
from subnets.data.dataset import LanguageData, load_language
from subnets.data.discovery import SPLITS, LanguageFiles


def support_split(treebank: LanguageFiles, k: int, sizes: dict[str, int]) -> str:
    """The split support sentences are drawn from: train, else dev, else test, the first with
    at least ``k`` sentences (``sizes``: the sizes of the splits, as far as they are known)."""
    found = {}
    for split in SPLITS:
        if split not in treebank.files or split not in sizes:
            continue
        found[split] = sizes[split]
        if found[split] >= k:
            return split
    listed = ", ".join(f"{split} ({n} sentences)" for split, n in found.items()) or "none"
    raise ValueError(
        f"{treebank.code}: no split holds k={k} sentences for few-shot support (fewshot.k); splits: {listed} "
        "(languages.max_eval_sentences, if set, caps the evaluated split)"
    )


def support_pool(
    treebank: LanguageFiles,
    evaluated: LanguageData,
    k: int,
    task,
    on_error: str = "raise",
    cache: DataCache | None = None,
) -> LanguageData:
    """The sentences ``k`` support sentences of ``evaluated``'s language are drawn from: the first
    split by [support_split][subnets.data.support.support_split] (read with ``on_error``, through ``cache``),
    which may be ``evaluated`` itself; raises if drawing them from the evaluated split would leave nothing to
    score."""
    loaded, sizes = {evaluated.split: evaluated}, {}
    for split in SPLITS:
        if split not in treebank.files:
            continue
        if split not in loaded:
            loaded[split] = load_language(treebank, split, task, on_error, cache=cache)
        sizes[split] = len(loaded[split])
        if sizes[split] >= k:
            break
    pool = loaded[support_split(treebank, k, sizes)]
    if pool is evaluated and len(evaluated) <= k:
        raise ValueError(
            f"{treebank.code}: the k={k} few-shot support sentences (fewshot.k) come from its {pool.split} "
            f"split, which is also the one scored, and it holds only {len(evaluated)} sentences: none "
            "would be left to score (lower fewshot.k, or raise languages.max_eval_sentences if set)"
        )
    return pool


def draw_support(
    pool: LanguageData, evaluated: LanguageData, k: int, seed: int
) -> tuple[LanguageData, LanguageData]:
    """Draw ``k`` support examples for ``evaluated``'s language from ``pool``
    ([support_pool][subnets.data.support.support_pool]); returns (support, evaluated data without the support
    examples). Deterministic for (seed, language)."""
    if len(pool) < k:
        raise ValueError(f"{evaluated.code}: fewshot.k={k} support examples, but its {pool.split} split "
                         f"({pool.path}) has {len(pool)}")  # fmt: skip
    rng = np.random.default_rng([seed, zlib.crc32(evaluated.code.encode())])
    chosen = sorted(int(i) for i in rng.choice(len(pool), size=k, replace=False))
    support = pool.subset(chosen, pool.split)
    if pool is not evaluated:
        return support, evaluated
    taken = set(chosen)
    return support, evaluated.subset([i for i in range(len(evaluated)) if i not in taken])
