"""One language's sentences of one split, read, validated and tokenized once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from subnets.data.batching import WordPieces, encode_words
from subnets.data.treebank import Sentence, read_conllu
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

    def tokenize(self, tokenizer) -> LanguageData:
        """Compute the subword pieces of every word with ``tokenizer``; returns ``self``."""
        self.pieces = encode_words(tokenizer, self.sentences)
        return self

    def subset(self, indices: list[int], split: str | None = None) -> LanguageData:
        """The sentences at ``indices`` (in that order) as a new :class:`LanguageData`."""
        pieces = None if self.pieces is None else [self.pieces[i] for i in indices]
        return LanguageData(
            self.code, split or self.split, [self.sentences[i] for i in indices], pieces, self.path
        )


def load_language(
    treebank: TreebankFiles, split: str, on_error: str = "raise", max_sentences: int | None = None
) -> LanguageData:
    """Read and validate ``split`` of ``treebank`` (its first ``max_sentences`` sentences).

    Skipped sentences are logged with their file, line and reason.
    """
    file = read_conllu(treebank.path(split), on_error=on_error)
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
