"""The data of a run: every language and split it trains on, selects checkpoints on and
evaluates, read once with the run's task (``load_run_data``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subnets.config import setting
from subnets.data.cache import DataCache, cache_folder
from subnets.data.dataset import LanguageData, load_language
from subnets.data.discovery import LanguageFiles, discover_languages, manifest_targets, select_languages
from subnets.data.support import draw_support, support_pool
from subnets.data.synthetic import SyntheticLanguage, write_synthetic_treebanks

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """A run's languages.

    Attributes:
        treebanks: every language's files found under ``root``, by code.
        train: source languages, train split (capped by ``languages.max_train_sentences``).
        dev: development languages, dev split (checkpoint selection).
        evaluated: every language and split evaluated at the end, keyed ``(role, code)`` with
            role ``source`` (dev split), ``dev`` or ``target`` (test split).
        target_test: the target languages' whole (capped) test splits, from which each few-shot
            repetition draws its support sentences.
        support: k support sentences per development and target language for the test-time
            mask policy (only when the policy needs them); drawn from the evaluated split,
            they are removed from it.
        support_pools: per target (and, for the policy, development) language, the split its
            support sentences are drawn from ([support_pool][subnets.data.support.support_pool]).
        skipped: invalid sentences left out per ``<code>-<split>`` (``languages.on_error=skip``),
            in every file read.
    """

    treebanks: dict[str, LanguageFiles]
    root: Path
    train: dict[str, LanguageData]
    dev: dict[str, LanguageData]
    evaluated: dict[tuple[str, str], LanguageData]
    target_test: dict[str, LanguageData]
    support: dict[str, LanguageData] = field(default_factory=dict)
    support_pools: dict[str, LanguageData] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def all(self) -> list[LanguageData]:
        """Every distinct [LanguageData][subnets.data.dataset.LanguageData] of the run (support sentences and
        pools included)."""
        items = [*self.train.values(), *self.dev.values(), *self.evaluated.values(), *self.support.values(),
                 *self.support_pools.values()]  # fmt: skip
        return list({id(d): d for d in items}.values())

    def tokenize(self, tokenizer, cache: DataCache | None = None) -> None:
        for data in self.all():
            data.tokenize(tokenizer, cache)


def data_cache(languages: Any) -> DataCache:
    """The cache of read and tokenized files (``languages.cache``, ``languages.cache_dir``)."""
    return DataCache(cache_folder(languages.cache_dir) if languages.cache else None)


def data_root(languages: Any, folder: Path) -> Path:
    """The folder of the run's languages: the synthetic languages written into ``folder/data``
    (treebanks and their NER and classification variants), or a folder of language folders
    (``languages.ud_root``, else ``$SUBNETS_UD_ROOT``: UD treebanks, or any task's files)."""
    if setting(languages.source) == "synthetic":
        synthetic = languages.synthetic
        specs = {code: SyntheticLanguage(code, **spec) for code, spec in synthetic.languages.items()}
        sizes = {"train": synthetic.train, "dev": synthetic.dev, "test": synthetic.test}
        return write_synthetic_treebanks(folder / "data", specs, sizes, synthetic.seed)
    configured = languages.ud_root or os.environ.get("SUBNETS_UD_ROOT")
    if not configured:
        raise ValueError("languages.source=ud needs languages.ud_root or the SUBNETS_UD_ROOT variable")
    return Path(configured).expanduser()


def load_run_data(
    languages: Any,
    fewshot: Any,
    root: Path,
    task,
    *,
    seed: int = 1,
    needs_support: bool = False,
    read_train: bool = True,
    cache: DataCache | None = None,
) -> RunData:
    """Read and validate, with ``task`` ([Task][subnets.tasks.Task]), every split the run uses
    (``languages.*`` settings) from the language folders under ``root``; with
    ``fewshot.repetitions > 0``, check now (not after training) that every target has
    ``fewshot.k`` support examples; with ``needs_support``, draw the development and target
    languages' support examples (seeded by ``seed``). ``read_train=False`` (the evaluation of a
    trained run) leaves the training splits unread (``train`` is empty). Files are read through
    ``cache`` if given (``data_cache``)."""
    treebanks = discover_languages(root, task.suffixes)
    on_error = setting(languages.on_error)
    if not languages.train:
        raise ValueError("languages.train is empty: name at least one training language")

    def load(code: str, split: str, cap: int | None) -> LanguageData:
        return load_language(treebanks[code], split, task, on_error, cap, cache)

    train_codes = list(languages.train)
    if not read_train:  # an evaluation scores the training languages' dev splits where the root has them
        train_codes = [code for code in train_codes if code in treebanks]
    train = select_languages(treebanks, train_codes, "languages.train", root, task.suffixes)
    dev = select_languages(treebanks, languages.dev, "languages.dev", root, task.suffixes)
    target_codes = list(languages.target)
    if target_codes == ["auto"]:
        target_codes = manifest_targets(root, treebanks, [*languages.train, *languages.dev])
    target = select_languages(treebanks, target_codes, "languages.target", root, task.suffixes)
    for role, split, selected in (("train", "train", train if read_train else []), ("dev", "dev", dev),
                                  ("target", "test", target)):  # fmt: skip
        for tb in selected:
            if split not in tb.files:
                tried = ", ".join(split + s for s in tb.tried)
                raise ValueError(f"languages.{role}: {tb.code} has no {split} split in {tb.folder} (tried {tried} "
                                 f"and a datasets folder; it has: {', '.join(tb.files) or 'none'})")  # fmt: skip
    cap = languages.max_eval_sentences
    data = RunData(
        treebanks,
        root,
        train={tb.code: load(tb.code, "train", languages.max_train_sentences) for tb in train if read_train},
        dev={tb.code: load(tb.code, "dev", cap) for tb in dev},
        evaluated={},
        target_test={},
    )
    for tb in train:
        if "dev" in tb.files:
            data.evaluated[("source", tb.code)] = load(tb.code, "dev", cap)
    for code, split in data.dev.items():
        data.evaluated[("dev", code)] = split
    for tb in target:
        data.evaluated[("target", tb.code)] = load(tb.code, "test", cap)
    data.target_test = {tb.code: data.evaluated[("target", tb.code)] for tb in target}
    # Where support examples come from, checked now (not after training) and read once.
    supported = [(r, c) for r, c in data.evaluated if r != "source"] if needs_support else []
    if fewshot.repetitions > 0:
        supported += [("target", code) for code in data.target_test if ("target", code) not in supported]
    for role, code in supported:
        data.support_pools[code] = support_pool(
            treebanks[code], data.evaluated[(role, code)], fewshot.k, task, on_error, cache
        )
    total = sum(d.skipped for d in data.all())
    if total:
        log.warning("skipped %d invalid example(s) in total (languages.on_error=skip)", total)
    data.skipped = {f"{d.code}-{d.split}": d.skipped for d in data.all() if d.skipped}
    if needs_support:
        for (role, code), evaluated in list(data.evaluated.items()):
            if role == "source":
                continue
            support, rest = draw_support(data.support_pools[code], evaluated, fewshot.k, seed)
            data.support[code] = support
            data.evaluated[(role, code)] = rest
            if role == "dev":
                data.dev[code] = rest
    return data
