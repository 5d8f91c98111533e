"""Universal Dependencies parsing (and UPOS tagging beside it): the library's first task.

Data: CoNLL-U files (``<code>/{train,dev,test}.conllu`` or the UD release layout) or ``datasets``
folders in the Hub's ``universal_dependencies`` layout, validated sentence by sentence
([subnets.data.treebank][]). Model: [DependencyParser][subnets.models.parser.DependencyParser]. Metrics:
UAS and LAS (primary) as the CoNLL 2018 scorer computes them, UPOS accuracy with ``tag``.
Predictions: CoNLL-U with the predicted columns, beside the gold sentences scored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from subnets.config import SettingError
from subnets.data.batching import Collator
from subnets.data.examples import ExampleFile, check_format
from subnets.data.hf import read_dataset_split
from subnets.data.treebank import Sentence, read_conllu, read_tokenized_text, write_conllu
from subnets.metrics import attachment_scores
from subnets.models.parser import DependencyParser, Prediction
from subnets.tasks.base import Task


def detect_format(path: Path, task: str = "parsing") -> str:
    """``conllu`` or ``text`` as [sniff_format][subnets.data.examples.sniff_format] finds it (and
    ``conllu`` when the first non-empty line is a comment, so that a bad word line is an error
    naming it); a file of another task's format is refused, naming what ``task`` reads."""
    found = check_format(path, task, ("conllu", "text"), "CoNLL-U or plain text (format=conllu|text)")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next(line.lstrip("\ufeff") for line in f if line.strip())
    return "conllu" if found == "conllu" or first.startswith("#") else "text"


def read_sentences(path: Path, format: str = "auto") -> list[Sentence]:
    """Sentences to annotate: CoNLL-U (format only checked) or one tokenized sentence per line."""
    if format == "auto":
        format = detect_format(path)
    if format == "conllu":
        return read_conllu(path, trees=False).examples
    if format == "text":
        return read_tokenized_text(path)
    raise SettingError(f"format={format!r}: expected auto, conllu or text")


def gold_path(predictions_path: str | os.PathLike) -> Path:
    """Where the gold sentences scored are written beside a predictions file."""
    path = Path(predictions_path)
    return path.with_name(path.name.removesuffix(".conllu") + ".gold.conllu")


class Parsing(Task):
    """Dependency parsing (``parse``), UPOS tagging (``tag``), or both (``task=parsing``,
    ``task=parsing_pos``). The other arguments size the parser's scorers
    ([DependencyParser][subnets.models.parser.DependencyParser])."""

    suffixes = (".conllu",)
    count = "words"
    prediction_suffix = ".conllu"

    def __init__(self, parse: bool = True, tag: bool = False, arc_dim: int = 256, label_dim: int = 128,
                 dropout: float = 0.33, word_dropout: float = 0.1):  # fmt: skip
        if not (parse or tag):
            raise SettingError("task.parse=false and task.tag=false: the task predicts nothing")
        self.parse, self.tag = bool(parse), bool(tag)
        self.sizes = {
            "arc_dim": arc_dim,
            "label_dim": label_dim,
            "dropout": dropout,
            "word_dropout": word_dropout,
        }
        self.name = "parsing_pos" if parse and tag else "parsing" if parse else "pos"
        self.metrics = (("uas", "las") if parse else ()) + (("upos",) if tag else ())
        self.primary = "las" if parse else "upos"

    def read(self, path: Path, on_error: str = "raise") -> ExampleFile:
        return read_dataset_split(path, on_error) if path.is_dir() else read_conllu(path, on_error=on_error)

    def cache_key(self) -> str:
        return "conllu"

    def read_unlabelled(self, path: Path, format: str = "auto") -> list[Sentence]:
        return read_sentences(path, format)

    def collator(self, tokenizer, max_length: int, causal: bool) -> Collator:
        return Collator(tokenizer, max_length, causal=causal)

    def build_model(self, encoder: nn.Module) -> DependencyParser:
        return DependencyParser(encoder, self.parse, self.tag, **self.sizes)

    def score(self, examples: Sequence[Sentence], predictions: Sequence[Prediction]) -> dict[str, float]:
        heads, deprels, upos = self._columns(predictions)
        return attachment_scores(examples, heads, deprels, upos)

    def write_predictions(self, path, examples: Sequence[Sentence], predictions: Sequence[Prediction],
                          scored: bool = True) -> Path:  # fmt: skip
        """CoNLL-U with the predicted HEAD and DEPREL (parsing) and UPOS (tagging), every other
        line and column as read. For ``scored`` (gold) sentences: ``_`` in the columns no task
        predicts (LEMMA, XPOS, FEATS, DEPS, and UPOS for a parser alone), so the file carries no
        gold value it did not predict, and the gold sentences scored in ``<name>.gold.conllu``,
        so that the official scorer compares the two files directly. A tagger alone keeps the
        gold HEAD and DEPREL (the format needs a tree; the scorer's UAS/LAS then mean nothing)."""
        heads, deprels, upos = self._columns(predictions)
        blank = ((2, 4, 5, 8) if upos else (2, 3, 4, 5, 8)) if scored else ()
        written = write_conllu(path, examples, heads, deprels, upos, blank=blank)
        if scored:
            write_conllu(gold_path(path), examples)
        return written

    def _columns(self, predictions: Sequence[Prediction]):
        heads = [p.heads for p in predictions] if self.parse else None
        deprels = [p.deprels for p in predictions] if self.parse else None
        upos = [p.upos for p in predictions] if self.tag else None
        return heads, deprels, upos
