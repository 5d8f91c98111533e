"""One language's sentences of one split, read, validated and tokenized once."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from subnets.data.batching import Batch, Collator, WordPieces, encode_words
from subnets.data.cache import TreebankCache
from subnets.data.hf import read_dataset_split
from subnets.data.treebank import ConlluFile, Sentence, read_conllu
from subnets.data.ud import TreebankFiles

log = logging.getLogger(__name__)


@dataclass
class LanguageData:
    """Sentences of one language and split, with their subword pieces.

    ``pieces`` is filled by :meth:`tokenize`; ``skipped`` counts the invalid sentences left
    out (``on_error="skip"``).
    """

    code: str
    split: str
    sentences: list[Sentence]
    pieces: list[WordPieces] | None = None
    path: Path | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def num_words(self) -> int:
        return sum(len(s) for s in self.sentences)

    def tokenize(self, tokenizer, cache: TreebankCache | None = None) -> LanguageData:
        """Compute the subword pieces of every word with ``tokenizer`` (or take them from
        ``cache``); returns ``self``."""
        if cache is None:
            self.pieces = encode_words(tokenizer, self.sentences)
        else:
            self.pieces = cache.pieces(
                self.sentences, tokenizer, lambda: encode_words(tokenizer, self.sentences)
            )
        return self

    def subset(self, indices: list[int], split: str | None = None) -> LanguageData:
        """The sentences at ``indices`` (in that order) as a new :class:`LanguageData`."""
        pieces = None if self.pieces is None else [self.pieces[i] for i in indices]
        return LanguageData(
            self.code, split or self.split, [self.sentences[i] for i in indices], pieces, self.path
        )


def read_treebank(path: Path, on_error: str = "raise") -> ConlluFile:
    """A split file: CoNLL-U, or a ``datasets`` split folder (:mod:`subnets.data.hf`)."""
    return read_dataset_split(path, on_error) if path.is_dir() else read_conllu(path, on_error=on_error)


def load_language(
    treebank: TreebankFiles,
    split: str,
    on_error: str = "raise",
    max_sentences: int | None = None,
    cache: TreebankCache | None = None,
) -> LanguageData:
    """Read and validate ``split`` of ``treebank`` (its first ``max_sentences`` sentences),
    through ``cache`` if given (:mod:`subnets.data.cache`).

    Skipped sentences are logged with their file, line and reason.
    """
    path = treebank.path(split)
    file = cache.read(path, on_error, read_treebank) if cache is not None else read_treebank(path, on_error)
    for error in file.skipped:
        log.warning("skipped invalid sentence: %s", error)
    if file.skipped:
        log.warning(
            "%s %s: skipped %d invalid sentence(s) of %d",
            treebank.code,
            split,
            len(file.skipped),
            len(file.skipped) + len(file.sentences),
        )
    sentences = file.sentences[:max_sentences] if max_sentences else file.sentences
    return LanguageData(treebank.code, split, sentences, None, file.path, len(file.skipped))


@dataclass
class Batcher:
    """Builds batches of :class:`LanguageData` for one encoder (``collator``) on ``device``.

    Example::

        batcher = Batcher(collator, "cpu", seed=1)
        batch = batcher.of(data, [0, 5, 7])                 # those sentences
        batches = batcher.fixed(data, 16, 8, "importance")  # 8 batches of 16, seeded order
    """

    collator: Collator
    device: torch.device | str = "cpu"
    seed: int = 0

    def of(self, data: LanguageData, indices: Sequence[int] | None = None) -> Batch:
        """The batch of ``data``'s sentences at ``indices`` (all, in order, by default)."""
        if data.pieces is None:
            raise ValueError(f"{data.code} {data.split}: tokenize the data before batching it")
        indices = range(len(data)) if indices is None else indices
        batch = self.collator(
            [data.sentences[i] for i in indices], [data.pieces[i] for i in indices], data.code
        )
        return batch.to(self.device)

    def micro_batches(self, data: LanguageData, max_tokens: int) -> list[Batch]:
        """All of ``data`` as one batch if its padded size (sentences x the longest sentence's
        subwords) is at most ``max_tokens``; else its sentences sorted by length and cut into
        batches that each stay within ``max_tokens`` (a longer sentence alone), for
        :func:`~subnets.update.training_step` to accumulate: one long sentence then no longer
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

    def fixed(self, data: LanguageData, size: int, count: int, salt: str = "") -> list[Batch]:
        """``count`` batches of ``size`` sentences of ``data`` in a fixed shuffled order, seeded
        by the batcher's seed, the language and ``salt`` (cycled when ``data`` is smaller)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{data.code}/{salt}".encode())])
        order = [int(i) for i in rng.permutation(len(data))]
        while len(order) < size * count:
            order += order
        return [self.of(data, order[b * size : (b + 1) * size]) for b in range(count)]
