"""Language modelling on raw text: masked (``task=mlm``, encoders) and causal (``task=clm``,
decoders), so that language-specific heads and neurons can be found from the language-modelling
loss (importance, Fisher, every method) and the masks reused for another task
(``masks.path``).

Data per language and split: ``<code>/<split>.txt`` (one sentence or document per line; blank
lines skipped), else the text of ``<code>/<split>.conllu`` (the words of each sentence), or a
``datasets`` folder with a ``text`` column. Each line is split into words at whitespace and
cut to the encoder's limit. Metrics: perplexity (primary; lower is better: exp of the mean
negative log-likelihood of the predicted tokens) and token accuracy, over the predicted tokens.
Predictions: JSON lines with each line's token count, negative log-likelihood and perplexity.
A task that does not fit the model is refused at start: ``mlm`` needs a tokenizer with a mask
token, ``clm`` a causal decoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from subnets.config import SettingError
from subnets.data.batching import WordCollator, WordPieces
from subnets.data.examples import DataError, ExampleFile, check_format, collect, read_utf8
from subnets.data.treebank import read_conllu
from subnets.files import atomic_write_text
from subnets.models.lm import LanguageModel
from subnets.tasks.base import Task


@dataclass
class TextLine:
    """One line of raw text, as words."""

    sent_id: str
    forms: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.forms)


@dataclass
class LMBatch:
    """Token input of a language model: ``special`` marks the framing and padding tokens (never
    masked); ``num_words``: the tokens a causal model predicts, or that a masked model may mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special: torch.Tensor
    examples: list = field(default_factory=list)
    lang: str = ""
    causal: bool = False

    @property
    def num_words(self) -> int:
        if self.causal:
            return int(self.attention_mask.sum()) - self.attention_mask.shape[0]
        return int((~self.special).sum())

    def to(self, device) -> LMBatch:
        return LMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.special.to(device),
                       self.examples, self.lang, self.causal)  # fmt: skip


class TextCollator(WordCollator):
    """``[CLS] tokens [SEP]`` (BOS and EOS for a decoder; no opening token where the tokenizer
    has none), cut to the encoder's limit."""

    def __call__(self, examples: Sequence[TextLine], pieces: Sequence[WordPieces], lang: str = "") -> LMBatch:
        opening = [] if self.cls_id is None else [self.cls_id]
        rows = [opening + [p for word in words for p in word][: self.max_length - self.framing] + [self.sep_id]
                for words in pieces]  # fmt: skip
        input_ids, attention_mask = self.pad(rows)
        special = attention_mask == 0
        special[:, 0] |= bool(opening)
        for r, row in enumerate(rows):
            special[r, len(row) - 1] = True
        return LMBatch(input_ids, attention_mask, special, list(examples), lang, self.causal)


class LanguageModelling(Task):
    """Masked (``objective=masked``) or causal (``causal``) language modelling (module docstring).

    Args:
        objective: ``masked`` or ``causal``.
        mlm_probability: the share of tokens a masked model predicts.
    """

    suffixes = (".txt", ".conllu")
    prediction_suffix = ".jsonl"
    metrics = ("perplexity", "token_accuracy")
    primary = "perplexity"
    lower_is_better = True
    count = "tokens"

    def __init__(self, objective: str = "masked", mlm_probability: float = 0.15):
        if objective not in ("masked", "causal"):
            raise SettingError(f"task.objective={objective!r}: expected masked or causal")
        if not 0 < mlm_probability < 1:
            raise SettingError(f"task.mlm_probability={mlm_probability}: expected in (0, 1)")
        self.objective, self.mlm_probability = objective, mlm_probability
        self.name = "mlm" if objective == "masked" else "clm"
        self.mask_id: int | None = None
        self.vocab_size = 0
        self.source: str | None = None

    def read(self, path: Path, on_error: str = "raise") -> ExampleFile:
        if path.is_dir():
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
            if "text" not in dataset.column_names:
                raise DataError(
                    path, 1, None, f"a datasets text split needs a text column; it has {dataset.column_names}"
                )
            items = ((n, str(n), row["text"]) for n, row in enumerate(dataset, start=1))
        elif path.suffix == ".conllu":
            sentences = read_conllu(path, on_error=on_error, trees=False).examples
            items = ((int(s.source.rpartition(":")[2]), s.sent_id, " ".join(s.forms)) for s in sentences)
        else:
            lines = read_utf8(path, "text").split("\n")
            items = ((n, str(n), line) for n, line in enumerate(lines, start=1) if line.strip())

        def parse(line: int, sent_id: str, text) -> TextLine:
            if not isinstance(text, str) or not text.split():
                raise DataError(path, line, sent_id, "empty text")
            return TextLine(sent_id, text.split(), f"{path}:{line}")

        return collect(path, items, parse, on_error, "line of text")

    def cache_key(self) -> str:
        return "text"

    def read_unlabelled(self, path: Path, format: str = "auto") -> list[TextLine]:
        if format not in ("auto", "text"):
            raise SettingError(f"format={format!r}: language modelling reads text (one line per example)")
        if format == "auto":  # the words of a .conllu file, else text
            accepted = ("conllu",) if path.suffix == ".conllu" else ("text",)
            check_format(
                path, self.name, accepted, "plain text (format=text), or the words of a .conllu file"
            )
        return self.read(path).examples

    def use_model(self, transformer: nn.Module, tokenizer, causal: bool) -> None:
        kind = type(transformer).__name__
        if self.objective == "masked" and tokenizer.mask_token_id is None:
            raise SettingError(
                f"task=mlm: the tokenizer of {kind} has no mask token (a decoder?); use task=clm"
            )
        if self.objective == "causal" and not causal:
            raise SettingError(f"task=clm: {kind} is a bidirectional encoder (its layout is not causal), which sees "
                               "the token it would predict; use task=mlm, or a decoder (e.g. model=tiny_qwen2)")  # fmt: skip
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.source = getattr(getattr(transformer, "config", None), "_name_or_path", None) or None

    def collator(self, tokenizer, max_length: int, causal: bool) -> TextCollator:
        return TextCollator(tokenizer, max_length, causal)

    def build_model(self, encoder: nn.Module) -> LanguageModel:
        return LanguageModel(
            encoder, self.objective, self.vocab_size, self.mask_id, self.mlm_probability, self.source
        )

    def score(
        self, examples: Sequence[TextLine], predictions: Sequence[tuple[float, int, int]]
    ) -> dict[str, float]:
        nll = sum(p[0] for p in predictions)
        tokens = sum(p[1] for p in predictions)
        if tokens == 0:
            raise ValueError("no token was predicted (texts too short?)")
        return {"tokens": tokens, "perplexity": math.exp(nll / tokens),
                "token_accuracy": 100.0 * sum(p[2] for p in predictions) / tokens}  # fmt: skip

    def write_predictions(self, path, examples, predictions, scored: bool = True) -> Path:
        lines = [json.dumps({"id": e.sent_id, "tokens": n, "nll": nll,
                             "perplexity": math.exp(nll / n) if n else None}) + "\n"
                 for e, (nll, n, _) in zip(examples, predictions)]  # fmt: skip
        return atomic_write_text(path, "".join(lines))
