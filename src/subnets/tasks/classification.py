"""Sentence and sentence-pair classification (``task=classification``: NLI, topic, sentiment, ...).

Data per language and split: JSON lines (``<code>/<split>.jsonl``: objects with ``text``, an
optional ``text_pair`` and ``label``; an ``id`` is kept), tab-separated files (``.tsv``: a
header line naming the columns ``text``, optionally ``text_pair``, and ``label``), or a
``datasets`` folder with those columns (a ``ClassLabel`` label is read by name). Text is split
into words at whitespace. A record (a header) naming another key is an error, and so is a file
mixing pairs and single texts. A label is a string; a JSON number or boolean is kept as JSON
writes it (``1`` "1", ``1.0`` "1.0", ``true`` "true"). The label set is the training data's; a
label at evaluation that training never saw is an error naming the file and line. The model reads the example's first
token (``[CLS]``; a causal decoder its final token) through the scalar mix
([SequenceClassifier][subnets.models.heads.SequenceClassifier]). Metrics: accuracy (primary) and macro-F1
(scikit-learn's), in percent. Predictions: JSON lines with the predicted ``label`` (and the
``gold`` one for scored data).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from subnets.config import SettingError
from subnets.data.batching import LabelledBatch, WordCollator, WordPieces
from subnets.data.examples import DataError, ExampleFile, check_format, collect, read_utf8
from subnets.files import atomic_write_text
from subnets.models.heads import SequenceClassifier
from subnets.tasks.base import LabelledTask

KEYS = ("id", "text", "text_pair", "label")  # what a JSON lines record or a TSV header may name


@dataclass
class TextExample:
    """One example: the words of its text, then those of its pair (from ``pair_start`` on, or
    no pair: None), and its label (None when unlabelled)."""

    sent_id: str
    forms: list[str]
    label: str | None
    pair_start: int | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.forms)


class PairCollator(WordCollator):
    """``[CLS] text [SEP] pair [SEP]`` (no opening token where the tokenizer has none), cut to
    the encoder's limit (the longer part first); position 0 of ``word_index`` is ``[CLS]``, or the
    final token for a causal decoder."""

    def __init__(self, tokenizer, max_length: int, causal: bool, index: Mapping[str, int]):
        super().__init__(tokenizer, max_length, causal)
        self.index = index

    def __call__(
        self, examples: Sequence[TextExample], pieces: Sequence[WordPieces], lang: str = ""
    ) -> LabelledBatch:
        rows = []
        for example, words in zip(examples, pieces):
            split = len(words) if example.pair_start is None else example.pair_start
            parts = [[p for word in words[:split] for p in word], [p for word in words[split:] for p in word]]
            budget = self.max_length - self.framing - (example.pair_start is not None)
            while sum(len(part) for part in parts) > budget:
                longer = max(parts, key=len)
                longer.pop()
            row = ([] if self.cls_id is None else [self.cls_id]) + parts[0] + [self.sep_id]
            if example.pair_start is not None:
                row += parts[1] + [self.sep_id]
            rows.append(row)
        input_ids, attention_mask = self.pad(rows)
        width = input_ids.shape[1]
        read = [len(row) - 1 if self.causal else 0 for row in rows]
        word_index = torch.tensor([[b * width + position] for b, position in enumerate(read)])
        word_mask = torch.ones((len(rows), 1), dtype=torch.bool)
        labels = torch.tensor([self.index.get(e.label, -100) for e in examples])
        return LabelledBatch(input_ids, attention_mask, word_index, word_mask, labels, list(examples), lang)


class Classification(LabelledTask):
    """Sentence or sentence-pair classification (module docstring)."""

    name = "classification"
    suffixes = (".jsonl", ".tsv")
    prediction_suffix = ".jsonl"
    metrics = ("accuracy", "macro_f1")
    primary = "accuracy"
    count = "examples"

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.dropout = dropout

    def example_labels(self, example: TextExample) -> list[str]:
        return [] if example.label is None else [example.label]

    def read(self, path: Path, on_error: str = "raise", labelled: bool = True) -> ExampleFile:
        if path.is_dir():
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
            names = getattr(dataset.features.get("label"), "names", None)
            rows = ((n, row) for n, row in enumerate(dataset, start=1))
            rows = ((n, {**row, "label": names[row["label"]] if names and isinstance(row.get("label"), int)
                         else row.get("label")}) for n, row in rows)  # fmt: skip
        elif path.suffix == ".tsv":
            rows = _tsv_rows(path)
        else:
            rows = _jsonl_rows(path)
        items = ((n, str(row.get("id", n)) if isinstance(row, dict) else str(n), row) for n, row in rows)

        def parse(line: int, sent_id: str, row) -> TextExample:
            if not isinstance(row, dict):
                raise DataError(
                    path, line, sent_id, f"expected an object with text and label, found {row!r:.60}"
                )
            text, pair, label = row.get("text"), row.get("text_pair"), row.get("label")
            if label is not None and not isinstance(label, (str, int, float)):
                raise DataError(
                    path, line, sent_id, f"the label {label!r:.40} is not a string, a number or a boolean"
                )
            if isinstance(label, (int, float)):  # as JSON writes it: 1 "1", 1.0 "1.0", true "true"
                label = json.dumps(label)
            if not isinstance(text, str) or not text.split():
                raise DataError(path, line, sent_id, "the text is missing or empty")
            if pair is not None and (not isinstance(pair, str) or not pair.split()):
                raise DataError(path, line, sent_id, "text_pair is given but empty")
            if labelled and (label is None or str(label) == ""):
                raise DataError(path, line, sent_id, "the label is missing (a label column or key 'label')")
            words = text.split()
            return TextExample(sent_id, words + (pair.split() if pair else []), label, len(words) if pair else None,
                               f"{path}:{line}")  # fmt: skip

        file = collect(path, items, parse, on_error, "example")
        first = file.examples[0]
        mixed = next((e for e in file.examples if (e.pair_start is None) != (first.pair_start is None)), None)
        if mixed is not None:
            has, other = ("no", "one") if mixed.pair_start is None else ("a", "none")
            raise DataError(path, int(mixed.source.rpartition(":")[2]), mixed.sent_id,
                            f"has {has} text_pair, while line {first.source.rpartition(':')[2]} has {other} "
                            "(a file holds pairs or single texts, not both)")  # fmt: skip
        return file

    def read_unlabelled(self, path: Path, format: str = "auto") -> list[TextExample]:
        if format != "auto":
            raise SettingError(
                f"format={format!r}: classification input is read by its suffix (.tsv, else JSON lines)"
            )
        # text in a .jsonl or .tsv file: the reader names the line that is not a record
        accepted = ("jsonl", "tsv", "text") if path.suffix in self.suffixes else ("jsonl", "tsv")
        check_format(
            path, self.name, accepted, "JSON lines or TSV (a header naming text[, text_pair], label)"
        )
        return self.read(path, "raise", labelled=False).examples

    def collator(self, tokenizer, max_length: int, causal: bool) -> PairCollator:
        return PairCollator(tokenizer, max_length, causal, self.index)

    def build_model(self, encoder: nn.Module) -> SequenceClassifier:
        return SequenceClassifier(encoder, len(self.labels), self.dropout)

    def score(self, examples: Sequence[TextExample], predictions: Sequence[int]) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        gold = [e.label for e in examples]
        predicted = [self.labels[p] for p in predictions]
        return {"examples": len(gold), "accuracy": 100.0 * accuracy_score(gold, predicted),
                "macro_f1": 100.0 * f1_score(gold, predicted, average="macro", labels=sorted(set(gold)), zero_division=0)}  # fmt: skip

    def write_predictions(self, path, examples, predictions, scored: bool = True) -> Path:
        lines = []
        for example, prediction in zip(examples, predictions):
            split = example.pair_start
            record = {"id": example.sent_id, "text": " ".join(example.forms[:split])}
            if split is not None:
                record["text_pair"] = " ".join(example.forms[split:])
            record["label"] = self.labels[prediction]
            if scored:
                record["gold"] = example.label
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        return atomic_write_text(path, "".join(lines))


def _jsonl_rows(path: Path):
    for number, line in enumerate(read_utf8(path, "JSON lines").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, number, None, f"not a JSON object: {error.msg}") from None
        unknown = [key for key in row if key not in KEYS] if isinstance(row, dict) else []
        if unknown:  # a misspelt text_pair would make a pair task single-text
            raise DataError(
                path,
                number,
                None,
                f"unknown key {unknown[0]!r} (a record has {', '.join(KEYS[:-1])} and {KEYS[-1]})",
            )
        yield number, row


def _tsv_rows(path: Path):
    text = read_utf8(path, "TSV")
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header or "text" not in header:
        raise DataError(
            path,
            1,
            None,
            f"expected a header line naming the columns text[, text_pair], label; found {header}",
        )
    unknown = [column for column in header if column not in KEYS]
    if unknown:
        raise DataError(
            path,
            1,
            None,
            f"unknown column {unknown[0]!r} (a header names {', '.join(KEYS[:-1])} and {KEYS[-1]})",
        )
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        number = reader.line_num
        if len(row) != len(header):
            raise DataError(path, number, None, f"{len(row)} columns, the header names {len(header)}")
        yield number, dict(zip(header, row))
