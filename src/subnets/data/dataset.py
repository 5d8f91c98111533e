"""One language's examples of one split, read, validated and tokenized once."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subnets.data.batching import WordPieces, encode_words
from subnets.data.cache import DataCache
from subnets.data.discovery import LanguageFiles

log = logging.getLogger(__name__)


@dataclass
class LanguageData:
    """Examples of one language and split (sentences, texts, ...: [subnets.data.examples][]),
    with their subword pieces.

    ``pieces`` is filled by [tokenize][subnets.data.dataset.LanguageData.tokenize]; ``skipped`` counts the
    invalid examples left out (``on_error="skip"``).
    """

    code: str
    split: str
    examples: list
    pieces: list[WordPieces] | None = None
    path: Path | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_words(self) -> int:
        return sum(len(e) for e in self.examples)

    def tokenize(self, tokenizer, cache: DataCache | None = None) -> LanguageData:
        """Compute the subword pieces of every word with ``tokenizer`` (or take them from
        ``cache``); returns ``self``."""
        if cache is None:
            self.pieces = encode_words(tokenizer, self.examples)
        else:
            self.pieces = cache.pieces(
                self.examples, tokenizer, lambda: encode_words(tokenizer, self.examples)
            )
        return self

    def subset(self, indices: list[int], split: str | None = None) -> LanguageData:
        """The examples at ``indices`` (in that order) as a new
        [LanguageData][subnets.data.dataset.LanguageData]."""
        pieces = None if self.pieces is None else [self.pieces[i] for i in indices]
        return LanguageData(
            self.code, split or self.split, [self.examples[i] for i in indices], pieces, self.path
        )


def load_language(
    files: LanguageFiles,
    split: str,
    task,
    on_error: str = "raise",
    max_examples: int | None = None,
    cache: DataCache | None = None,
) -> LanguageData:
    """Read and validate ``split`` of a language with the ``task``'s reader
    ([read][subnets.tasks.base.Task.read]; its first ``max_examples`` examples), through ``cache``
    if given (``subnets.data.cache``).

    Skipped examples are logged with their file, line and reason.
    """
    path = files.path(split)
    if cache is not None:
        file = cache.read(path, on_error, task.read, task.cache_key())
    else:
        file = task.read(path, on_error)
    for error in file.skipped:
        log.warning("skipped invalid example: %s", error)
    if file.skipped:
        log.warning("%s %s: skipped %d invalid example(s) of %d", files.code, split, len(file.skipped),
                    len(file.skipped) + len(file.examples))  # fmt: skip
    examples = file.examples[:max_examples] if max_examples else file.examples
    return LanguageData(files.code, split, examples, None, file.path, len(file.skipped))


@dataclass
class Batcher:
    """Builds batches of [LanguageData][subnets.data.dataset.LanguageData] for one encoder (``collator``) on
    ``device``.

    Example::

        batcher = Batcher(collator, "cpu", seed=1)
        batch = batcher.of(data, [0, 5, 7])                 # those examples
        batches = batcher.fixed(data, 16, 8, "importance")  # 8 batches of 16, seeded order
    """

    collator: Callable  # (examples, pieces, lang) -> batch: a task's collator
    device: torch.device | str = "cpu"
    seed: int = 0

    def of(self, data: LanguageData, indices: Sequence[int] | None = None) -> Any:
        """The batch of ``data``'s examples at ``indices`` (all, in order, by default)."""
        if data.pieces is None:
            raise ValueError(f"{data.code} {data.split}: tokenize the data before batching it")
        indices = range(len(data)) if indices is None else indices
        batch = self.collator(
            [data.examples[i] for i in indices], [data.pieces[i] for i in indices], data.code
        )
        return batch.to(self.device)

    def micro_batches(self, data: LanguageData, max_tokens: int) -> list:
        """All of ``data`` as one batch if its padded size (sentences x the longest sentence's
        subwords) is at most ``max_tokens``; else its sentences sorted by length and cut into
        batches that each stay within ``max_tokens`` (a longer sentence alone), for
        [training_step][subnets.training.update.training_step] to accumulate: one long sentence then no longer
        pads every other one to its length."""
        if data.pieces is None:
            raise ValueError(f"{data.code} {data.split}: tokenize the data before batching it")
        lengths = [sum(len(word) for word in pieces) + 2 for pieces in data.pieces]  # + [CLS], [SEP]
        if not lengths or len(lengths) * max(lengths) <= max_tokens:
            return [self.of(data)]
        parts: list[list[int]] = [[]]
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            if parts[-1] and (len(parts[-1]) + 1) * lengths[i] > max_tokens:
                parts.append([])
            parts[-1].append(i)
        return [self.of(data, part) for part in parts]

    def fixed(self, data: LanguageData, size: int, count: int, salt: str = "") -> list:
        """``count`` batches of ``size`` sentences of ``data`` in a fixed shuffled order, seeded
        by the batcher's seed, the language and ``salt`` (cycled when ``data`` is smaller)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{data.code}/{salt}".encode())])
        order = [int(i) for i in rng.permutation(len(data))]
        while len(order) < size * count:
            order += order
        return [self.of(data, order[b * size : (b + 1) * size]) for b in range(count)]
