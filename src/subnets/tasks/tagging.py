"""Token classification: a tag per word. Two tasks share the model
([TokenClassifier][subnets.models.heads.TokenClassifier], a linear layer on the word representations):

* [Tagging][subnets.tasks.tagging.Tagging] (``task=tagging``, ``task=pos``): any token column of CoNLL-U files
  (``upos``, ``xpos``, ``feats``, ``deprel``), so UD treebanks serve token classification. ``_`` is an
  unlabelled word (left out of the loss and the score). Metric: accuracy over the labelled words,
  named by the column. Predictions: CoNLL-U with the column filled in.
* [NER][subnets.tasks.tagging.NER] (``task=ner``): named entities in IOB2 (BIO) tags, from CoNLL-style files
  (a token and its tag per line, the tag in the last column; tab-separated, the token is the first
  column, spaces and all, else columns are split at whitespace; a blank line between sentences,
  ``-DOCSTART-`` lines skipped; ``<code>/{train,dev,test}.conll``, ``.iob2``, ``.bio`` or
  ``.txt``) or ``datasets`` folders with ``tokens`` and ``ner_tags`` columns. An entity that
  starts with ``I-`` (after ``O`` or another type) is read as ``B-``, as seqeval and conlleval
  read it, with a warning that says where. Metrics: span precision, recall and F1 (primary) as
  seqeval computes them (CoNLL-2000 chunk rules). Predictions: ``token gold predicted`` columns
  (conlleval's input) for scored data, ``token predicted`` otherwise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from subnets.config import SettingError
from subnets.data.batching import LabelledBatch, WordCollator, WordPieces
from subnets.data.examples import FORMATS, IOB2, DataError, ExampleFile, check_format, collect, read_utf8
from subnets.data.labels import UPOS
from subnets.data.treebank import read_conllu, read_tokenized_text
from subnets.files import atomic_write_text
from subnets.models.heads import TokenClassifier
from subnets.tasks.base import LabelledTask
from subnets.tasks.parsing import detect_format

log = logging.getLogger(__name__)
UNLABELLED = "_"
COLUMNS = {"upos": 3, "xpos": 4, "feats": 5, "deprel": 7}
_WORD_ID = re.compile(r"[1-9][0-9]*\Z")


@dataclass
class TaggedSentence:
    """A sentence's words and a tag per word (``_``: unlabelled); ``lines`` are its CoNLL-U lines
    where it was read from CoNLL-U (predictions are written back into them)."""

    sent_id: str
    forms: list[str]
    tags: list[str]
    lines: list[str] | None = field(default=None, repr=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.forms)


class TagCollator(WordCollator):
    """Word-level input ([WordCollator][subnets.data.batching.WordCollator]) and a label per word."""

    def __init__(self, tokenizer, max_length: int, causal: bool, index: Mapping[str, int]):
        super().__init__(tokenizer, max_length, causal)
        self.index = index

    def __call__(
        self, examples: Sequence[TaggedSentence], pieces: Sequence[WordPieces], lang: str = ""
    ) -> LabelledBatch:
        input_ids, attention_mask, word_index, word_mask = self.encode(pieces)
        labels = torch.full(word_mask.shape, -100, dtype=torch.long)
        for b, example in enumerate(examples):
            labels[b, 1 : len(example) + 1] = torch.tensor([self.index.get(t, -100) for t in example.tags])
        return LabelledBatch(input_ids, attention_mask, word_index, word_mask, labels, list(examples), lang)


class TokenTask(LabelledTask):
    """What [Tagging][subnets.tasks.tagging.Tagging] and [NER][subnets.tasks.tagging.NER] share: the collator,
    the model, the predictions."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.dropout = dropout

    def example_labels(self, example: TaggedSentence) -> list[str]:
        return [t for t in example.tags if t != UNLABELLED]

    def collator(self, tokenizer, max_length: int, causal: bool) -> TagCollator:
        return TagCollator(tokenizer, max_length, causal, self.index)

    def build_model(self, encoder: nn.Module) -> TokenClassifier:
        return TokenClassifier(encoder, len(self.labels), self.dropout)

    def tags_of(self, predictions: Sequence[Sequence[int]]) -> list[list[str]]:
        return [[self.labels[i] for i in p] for p in predictions]


class Tagging(TokenTask):
    """A token column of CoNLL-U (module docstring). ``column``: ``upos`` (the fixed UD
    inventory), ``xpos``, ``feats`` or ``deprel`` (label sets from the training data)."""

    suffixes = (".conllu",)
    count = "words"
    prediction_suffix = ".conllu"

    def __init__(self, column: str = "upos", dropout: float = 0.1):
        super().__init__(dropout)
        if column not in COLUMNS:
            raise SettingError(f"task.column={column!r}: expected one of {', '.join(COLUMNS)}")
        self.column = column
        self.name = "pos" if column == "upos" else f"tagging_{column}"
        self.metrics = (column,)
        self.primary = column

    def fit(self, train) -> None:
        if self.column == "upos":  # the universal inventory: the same model output for every language
            self.labels = list(UPOS)
        else:
            super().fit(train)

    def read(self, path: Path, on_error: str = "raise") -> ExampleFile:
        if path.is_dir():
            from subnets.data.hf import read_dataset_split

            file = read_dataset_split(path, on_error)
        else:
            file = read_conllu(path, on_error=on_error, trees=False)
        examples = [self._tagged(s) for s in file.examples]
        if not any(self.example_labels(e) for e in examples):  # nothing to learn or score
            raise DataError(file.path, 1, None, f"column {self.column.upper()} is '_' on every word; the {self.name} task "
                                                f"needs it annotated (task.column=upos|xpos|feats|deprel picks the column)")  # fmt: skip
        return ExampleFile(file.path, examples, file.skipped)

    def _tagged(self, sentence) -> TaggedSentence:
        lines = sentence.lines
        words = [
            line.split("\t")
            for line in lines
            if not line.startswith("#") and _WORD_ID.match(line.split("\t")[0])
        ]
        return TaggedSentence(sentence.sent_id, list(sentence.forms), [w[COLUMNS[self.column]] or UNLABELLED for w in words],
                              lines, sentence.source)  # fmt: skip

    def read_unlabelled(self, path: Path, format: str = "auto") -> list[TaggedSentence]:
        if format == "auto":
            format = detect_format(path, self.name)
        if format == "text":
            sentences = read_tokenized_text(path)
        elif format == "conllu":
            sentences = read_conllu(path, trees=False).examples
        else:
            raise SettingError(f"format={format!r}: expected auto, conllu or text")
        return [self._tagged(s) for s in sentences]

    def score(
        self, examples: Sequence[TaggedSentence], predictions: Sequence[Sequence[int]]
    ) -> dict[str, float]:
        gold = [t for e in examples for t in e.tags]
        predicted = [t for p in self.tags_of(predictions) for t in p]
        scored = [(g, p) for g, p in zip(gold, predicted) if g != UNLABELLED]
        if not scored:
            raise ValueError(f"no labelled words to score ({self.column} is '_' everywhere)")
        return {"words": len(scored), self.column: 100.0 * sum(g == p for g, p in scored) / len(scored)}

    def write_predictions(self, path, examples, predictions, scored: bool = True) -> Path:
        """CoNLL-U with the predicted column; for scored (gold) sentences, ``_`` in the other
        columns no task predicts (LEMMA, UPOS, XPOS, FEATS, DEPS, whichever is not predicted)."""
        column = COLUMNS[self.column]
        blank = {2, 3, 4, 5, 8} - {column} if scored else set()
        parts = []
        for example, tags in zip(examples, self.tags_of(predictions)):
            word = 0
            for line in example.lines:
                columns = line.split("\t")
                if not line.startswith("#") and _WORD_ID.match(columns[0]):
                    for c in blank:
                        columns[c] = "_"
                    columns[column] = tags[word]
                    word += 1
                parts.append("\t".join(columns) + "\n")
            parts.append("\n")
        return atomic_write_text(path, "".join(parts))


class NER(TokenTask):
    """Named-entity recognition in IOB2 tags (module docstring)."""

    name = "ner"
    suffixes = (".conll", ".iob2", ".bio", ".txt")
    prediction_suffix = ".conll"
    metrics = ("f1", "precision", "recall")
    primary = "f1"
    count = "words"

    def fit(self, train) -> None:
        super().fit(train)
        self.labels = self._closed(self.labels)

    @staticmethod
    def _closed(labels: Sequence[str]) -> list[str]:
        """``O`` and both B- and I- of every entity type seen (a type seen only in single-word
        entities still gets its I- tag)."""
        types = sorted({label[2:] for label in labels if label != "O"})
        return ["O", *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I"))]

    def check(self, examples, where: str) -> None:
        known = {label[2:] for label in self.labels if label != "O"}
        for example in examples:
            unseen = [t for t in example.tags if t != "O" and t[2:] not in known]
            if unseen:
                path, _, line = example.source.rpartition(":")
                raise DataError(path or where, int(line) if line.isdigit() else 1, example.sent_id,
                                f"entity type {unseen[0][2:]!r} never occurs in the training data (task ner knows "
                                f"{', '.join(sorted(known))}); a model cannot predict it")  # fmt: skip

    def read(self, path: Path, on_error: str = "raise") -> ExampleFile:
        file = self._read_dataset(path, on_error) if path.is_dir() else self._read_conll(path, on_error)
        repaired = [(e, n) for e, n in ((e, _repair_iob2(e.tags)) for e in file.examples) if n]
        if repaired:
            log.warning("%s: %d entity span(s) in %d sentence(s) started with I- and were read as B- (as seqeval and "
                        "conlleval read them; first at %s)", path, sum(n for _, n in repaired), len(repaired),
                        repaired[0][0].source)  # fmt: skip
        return file

    def _read_conll(self, path: Path, on_error: str, labelled: bool = True) -> ExampleFile:
        text = read_utf8(path, "CoNLL")
        blocks, block, start = [], [], 0
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.rstrip("\r")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if block:
                    blocks.append((start, str(len(blocks) + 1), block))
                block = []
                continue
            if not block:
                start = number
            block.append((number, line))
        if block:
            blocks.append((start, str(len(blocks) + 1), block))

        def parse(first: int, sent_id: str, rows) -> TaggedSentence:
            forms, tags = [], []
            for number, line in rows:
                # tab-separated: the token is the first column, spaces and all; else split at whitespace
                columns = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
                if labelled and len(columns) < 2:
                    raise DataError(path, number, sent_id, f"expected a token and its tag, found {line!r}")
                if labelled and not IOB2.match(columns[-1]):
                    raise DataError(
                        path, number, sent_id, f"tag {columns[-1]!r} is not IOB2 (O, B-TYPE or I-TYPE)"
                    )
                if not columns[0]:
                    raise DataError(path, number, sent_id, f"the token is empty (found {line!r})")
                forms.append(columns[0])
                tags.append(columns[-1] if labelled else "O")
            return TaggedSentence(sent_id, forms, tags, None, f"{path}:{first}")

        return collect(path, blocks, parse, on_error, "sentence")

    def _read_dataset(self, path: Path, on_error: str) -> ExampleFile:
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        column = next((c for c in ("ner_tags", "tags", "labels") if c in dataset.column_names), None)
        if "tokens" not in dataset.column_names or column is None:
            raise DataError(path, 1, None, f"a datasets NER split needs the columns tokens and ner_tags; it has "
                                           f"{', '.join(dataset.column_names)}")  # fmt: skip
        names = getattr(getattr(dataset.features[column], "feature", None), "names", None)

        def parse(row_number: int, sent_id: str, row) -> TaggedSentence:
            tokens, tags = (
                row["tokens"],
                [names[t] if names and isinstance(t, int) else str(t) for t in row[column]],
            )
            if not tokens or len(tags) != len(tokens):
                raise DataError(
                    path, row_number, sent_id, f"row {row_number}: {len(tokens)} tokens, {len(tags)} tags"
                )
            for i, (token, tag) in enumerate(zip(tokens, tags), start=1):
                if not isinstance(token, str) or not token.strip():
                    raise DataError(path, row_number, sent_id, f"row {row_number}: token {i} is empty")
                if not IOB2.match(tag):
                    raise DataError(path, row_number, sent_id, f"row {row_number}: tag {tag!r} is not IOB2")
            return TaggedSentence(sent_id, list(tokens), tags, None, f"{path}:{row_number}")

        rows = ((n, str(row.get("id") or n), row) for n, row in enumerate(dataset, start=1))
        return collect(path, rows, parse, on_error, "sentence")

    def read_unlabelled(self, path: Path, format: str = "auto") -> list[TaggedSentence]:
        if format == "auto":  # CoNLL: a token (and a tag) per line; text: a sentence per line
            format = check_format(path, self.name, ("conll", "text"),
                                  f"{FORMATS['conll']} or plain text (format=conll|text)")  # fmt: skip
            with open(path, encoding="utf-8", errors="replace") as f:
                first = next((line.split() for line in f if line.strip() and not line.startswith("#")), [])
            format = "conll" if format == "conll" or len(first) == 1 else "text"
        if format == "text":
            return [
                TaggedSentence(s.sent_id, s.forms, ["O"] * len(s), None, s.source)
                for s in read_tokenized_text(path)
            ]
        if format == "conll":
            return self._read_conll(path, "raise", labelled=False).examples
        raise SettingError(f"format={format!r}: expected auto, conll or text")

    def score(self, examples, predictions) -> dict[str, float]:
        from seqeval.metrics import f1_score, precision_score, recall_score

        gold, predicted = [e.tags for e in examples], self.tags_of(predictions)
        kind = {"zero_division": 0}  # no entity predicted (or none in the gold data): 0, without a warning
        return {"words": sum(len(e) for e in examples), "f1": 100.0 * float(f1_score(gold, predicted, **kind)),
                "precision": 100.0 * float(precision_score(gold, predicted, **kind)),
                "recall": 100.0 * float(recall_score(gold, predicted, **kind))}  # fmt: skip

    def write_predictions(self, path, examples, predictions, scored: bool = True) -> Path:
        """``token gold predicted`` per line (conlleval's input) for scored data, ``token predicted``
        otherwise; a blank line between sentences."""
        parts = []
        for example, tags in zip(examples, self.tags_of(predictions)):
            for form, gold, tag in zip(example.forms, example.tags, tags):
                parts.append(f"{form}\t{gold}\t{tag}\n" if scored else f"{form}\t{tag}\n")
            parts.append("\n")
        return atomic_write_text(path, "".join(parts))


def _repair_iob2(tags: list[str]) -> int:
    """Turn, in place, every I- tag that starts an entity (after O, at the start, or after
    another type) into B-; returns how many."""
    repaired, previous = 0, "O"
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tags[i] = "B-" + tag[2:]
            repaired += 1
        previous = tags[i]
    return repaired
