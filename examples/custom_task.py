"""A task of your own, outside the package: part-of-speech tags in the slash format.

Each language folder holds ``<split>.tags`` files, a sentence per line, every word written as
``word/TAG`` (``the/DET dog/NOUN barks/VERB``). The task reads and validates them (errors name the
file and line), reuses the library's word-level collator and token classifier, scores accuracy,
and writes its predictions in the same format. Select it with a config of your own::

    # my_configs/task/slash.yaml
    _target_: custom_task.SlashTagging
    dropout: 0.1

    PYTHONPATH=examples python -m subnets.train --config-dir my_configs task=slash \\
        languages.source=ud languages.ud_root=<folder of language folders>

Every method, the few-shot protocol, ``subnets.evaluate`` and ``subnets.predict`` then work with it.
"""

from __future__ import annotations

from pathlib import Path

from subnets.data.examples import DataError, ExampleFile, collect, read_utf8
from subnets.files import atomic_write_text
from subnets.models.heads import TokenClassifier
from subnets.tasks import LabelledTask
from subnets.tasks.tagging import TagCollator, TaggedSentence


class SlashTagging(LabelledTask):
    """Tags written as ``word/TAG`` (module docstring)."""

    name = "slash_tagging"
    suffixes = (".tags",)
    metrics = ("accuracy",)
    primary = "accuracy"
    count = "words"
    prediction_suffix = ".tags"

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.dropout = dropout

    def example_labels(self, example: TaggedSentence) -> list[str]:
        return example.tags

    def read(self, path: Path, on_error: str = "raise", labelled: bool = True) -> ExampleFile:
        lines = read_utf8(path, "slash-tagged").split("\n")
        items = ((number, str(number), line) for number, line in enumerate(lines, start=1) if line.strip())

        def parse(number: int, sent_id: str, line: str) -> TaggedSentence:
            forms, tags = [], []
            for token in line.split():
                word, slash, tag = token.rpartition("/")
                if labelled and (not slash or not word or not tag):
                    raise DataError(path, number, sent_id, f"{token!r} is not word/TAG")
                forms.append(word if labelled else token)
                tags.append(tag if labelled else "_")
            return TaggedSentence(sent_id, forms, tags, None, f"{path}:{number}")

        return collect(path, items, parse, on_error, "sentence")

    def read_unlabelled(self, path: Path, format: str = "auto") -> list[TaggedSentence]:
        return self.read(path, "raise", labelled=False).examples  # a tokenized sentence per line

    def collator(self, tokenizer, max_length: int, causal: bool) -> TagCollator:
        return TagCollator(tokenizer, max_length, causal, self.index)

    def build_model(self, encoder) -> TokenClassifier:
        return TokenClassifier(encoder, len(self.labels), self.dropout)

    def score(self, examples, predictions) -> dict[str, float]:
        pairs = [
            (gold, self.labels[p]) for e, ps in zip(examples, predictions) for gold, p in zip(e.tags, ps)
        ]
        return {"words": len(pairs), "accuracy": 100.0 * sum(g == p for g, p in pairs) / len(pairs)}

    def write_predictions(self, path, examples, predictions, scored: bool = True) -> Path:
        lines = [
            " ".join(f"{w}/{self.labels[p]}" for w, p in zip(e.forms, ps)) + "\n"
            for e, ps in zip(examples, predictions)
        ]
        return atomic_write_text(path, "".join(lines))
