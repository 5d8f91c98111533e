"""Task heads on an [Encoder][subnets.models.encoder.Encoder]: the base every task model shares,
and the classifiers of words (tagging, NER) and of sentences or sentence pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TaskOutput:
    """Losses (means over the batch's ``num_words``) and scores of one forward pass."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: torch.Tensor | None = None


class TaskModel(nn.Module):
    """A task head on an [Encoder][subnets.models.encoder.Encoder] (``self.encoder``).

    ``model(batch)`` returns an object with ``loss`` (a mean over the batch's ``num_words``)
    and ``losses``; ``model.predict(batch)`` one prediction per example;
    ``model.sentence_representations(batch)`` ``[B, D]`` (for CKA)."""

    encoder: nn.Module

    @property
    def gates(self):
        """The encoder's [UnitGates][subnets.models.gates.UnitGates] (heads, neurons or both)."""
        return self.encoder.gates

    def encoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters of the pretrained transformer (the rest are task-head parameters)."""
        return [(f"encoder.transformer.{n}", p) for n, p in self.encoder.transformer.named_parameters()]

    def words(self, batch) -> torch.Tensor:
        """``[B, 1 + W, D]`` word representations (position 0: the root or sentence token)."""
        return self.encoder(batch.input_ids, batch.attention_mask, batch.word_index)

    def sentence_representations(self, batch) -> torch.Tensor:
        """``[B, D]``: the mean of each example's word representations."""
        words = self.words(batch)
        mask = batch.word_mask.unsqueeze(-1).to(words.dtype)
        return (words * mask).sum(1) / mask.sum(1).clamp(min=1)


class TokenClassifier(TaskModel):
    """A label per word (tagging, NER): dropout and a linear layer on the word representations;
    words labelled ``-100`` (unlabelled, the root, padding) are left out of the loss."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.hidden_size, num_labels)

    def forward(self, batch) -> TaskOutput:
        scores = self.classifier(self.dropout(self.words(batch)))
        loss = F.cross_entropy(scores.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        return TaskOutput(loss, {"tags": loss.detach()}, scores)

    @torch.no_grad()
    def predict(self, batch) -> list[list[int]]:
        """Label indices of every example's words."""
        best = self.classifier(self.words(batch)).argmax(-1).cpu()
        lengths = batch.word_mask.sum(1).tolist()
        return [best[b, 1 : n + 1].tolist() for b, n in enumerate(lengths)]


class SequenceClassifier(TaskModel):
    """A label per example (a sentence or a sentence pair): dropout and a linear layer on the
    example's representing token (``[CLS]``, or the final token of a causal decoder)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.hidden_size, num_labels)

    def sentence_representations(self, batch) -> torch.Tensor:
        return self.words(batch)[:, 0]

    def forward(self, batch) -> TaskOutput:
        scores = self.classifier(self.dropout(self.sentence_representations(batch)))
        loss = F.cross_entropy(scores, batch.labels)
        return TaskOutput(loss, {"classes": loss.detach()}, scores)

    @torch.no_grad()
    def predict(self, batch) -> list[int]:
        """The label index of every example."""
        return self.classifier(self.sentence_representations(batch)).argmax(-1).cpu().tolist()
