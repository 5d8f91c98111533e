"""UDify-style dependency parser and UPOS tagger on top of an [Encoder][subnets.models.encoder.Encoder].

Arcs are scored by a biaffine function and labels by a bilinear one (Dozat & Manning 2017)::

    s_arc[d, h]    = dep_d^T W head_h + head_h^T b
    s_label[d, r]  = dep'_d^T U_r head'_{h(d)} + V_r [dep'_d; head'_{h(d)}] + c_r

with ``dep``/``head`` (and primed) MLP projections of the word representations. Training uses
the gold heads for the label scores; prediction decodes a single-root maximum spanning tree
(``decode_mst``) and labels its arcs, giving ``root`` exactly to the
word attached to the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from subnets.data.batching import Batch
from subnets.data.labels import DEPRELS, ROOT_DEPREL, UPOS
from subnets.models.encoder import Encoder
from subnets.models.heads import TaskModel
from subnets.models.mst import decode_mst


class MLP(nn.Sequential):
    def __init__(self, input_dim: int, output_dim: int, dropout: float):
        super().__init__(nn.Linear(input_dim, output_dim), nn.LeakyReLU(0.1), nn.Dropout(dropout))


class BiaffineArcScorer(nn.Module):
    """``scores[b, d, h]``: score of word ``h`` heading word ``d``."""

    def __init__(self, input_dim: int, arc_dim: int, dropout: float):
        super().__init__()
        self.dep = MLP(input_dim, arc_dim, dropout)
        self.head = MLP(input_dim, arc_dim, dropout)
        self.weight = nn.Parameter(torch.zeros(arc_dim, arc_dim))
        self.head_bias = nn.Parameter(torch.zeros(arc_dim))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        dep, head = self.dep(words), self.head(words)
        return (dep @ self.weight) @ head.transpose(1, 2) + (head @ self.head_bias).unsqueeze(1)


class BilinearLabelScorer(nn.Module):
    """``scores[b, d, r]``: score of relation ``r`` for the arc from ``heads[b, d]`` to ``d``."""

    def __init__(self, input_dim: int, label_dim: int, num_labels: int, dropout: float):
        super().__init__()
        self.dep = MLP(input_dim, label_dim, dropout)
        self.head = MLP(input_dim, label_dim, dropout)
        self.weight = nn.Parameter(torch.zeros(label_dim, num_labels, label_dim))
        self.linear = nn.Linear(2 * label_dim, num_labels)

    def forward(self, words: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        dep = self.dep(words)
        head = self.head(words).gather(1, heads.unsqueeze(-1).expand(-1, -1, dep.shape[-1]))
        # dep^T U_r head as two matrix products (nn.Bilinear's backward is very slow on CPU)
        projected = (dep @ self.weight.flatten(1)).unflatten(-1, self.weight.shape[1:])  # [B, N, R, k]
        bilinear = (projected @ head.unsqueeze(-1)).squeeze(-1)
        return bilinear + self.linear(torch.cat([dep, head], dim=-1))


@dataclass
class ParserOutput:
    """Losses (means over the batch's words) and scores of one forward pass."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    arc_scores: torch.Tensor | None = None
    label_scores: torch.Tensor | None = None
    upos_scores: torch.Tensor | None = None


@dataclass
class Prediction:
    """Predicted annotation of one sentence's words (heads 1-based, 0 for the root)."""

    heads: list[int] | None
    deprels: list[str] | None
    upos: list[str] | None


class DependencyParser(TaskModel):
    """Encoder + task heads: dependency arcs and labels (``parse``), UPOS tags (``tag``), or both
    (the model of [Parsing][subnets.tasks.Parsing]). ``model(batch)`` returns the losses,
    ``model.predict(batch)`` one [Prediction][subnets.models.parser.Prediction] per sentence;
    ``model.parsing`` / ``model.tagging`` say which predictions are made.

    Example::

        parser = DependencyParser(Encoder(transformer))            # parse=True, tag=False
        out = parser(batch)            # out.loss
        predictions = parser.predict(batch)
    """

    def __init__(
        self,
        encoder: Encoder,
        parse: bool = True,
        tag: bool = False,
        arc_dim: int = 256,
        label_dim: int = 128,
        dropout: float = 0.33,
        word_dropout: float = 0.1,
    ):
        super().__init__()
        if not (parse or tag):
            raise ValueError("the task model predicts nothing: set task.parse=true, task.tag=true or both")
        self.encoder = encoder
        self.word_dropout = nn.Dropout(word_dropout)
        size = encoder.hidden_size
        self.parsing, self.tagging = bool(parse), bool(tag)
        if self.parsing:
            self.arc = BiaffineArcScorer(size, arc_dim, dropout)
            self.label = BilinearLabelScorer(size, label_dim, len(DEPRELS), dropout)
        if self.tagging:
            self.tagger = nn.Linear(size, len(UPOS))

    def represent(self, batch: Batch) -> torch.Tensor:
        """The word representations the scorers read (with word dropout in training)."""
        return self.word_dropout(self.words(batch))

    def arc_scores(self, words: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Biaffine arc scores with impossible heads (padding, the word itself) at -inf."""
        scores = self.arc(words)
        candidates = batch.word_mask.clone()
        candidates[:, 0] = True
        size = scores.shape[1]
        impossible = ~candidates.unsqueeze(1) | torch.eye(size, dtype=torch.bool, device=scores.device)
        return scores.masked_fill(impossible, float("-inf"))

    def forward(self, batch: Batch) -> ParserOutput:
        words = self.represent(batch)
        mask = batch.word_mask
        losses, out = {}, {}
        if self.parsing:
            arcs = self.arc_scores(words, batch)
            labels = self.label(words, batch.heads)
            losses["arc"] = F.cross_entropy(arcs[mask], batch.heads[mask])
            losses["label"] = F.cross_entropy(labels[mask], batch.deprels[mask])
            out.update(arc_scores=arcs, label_scores=labels)
        if self.tagging:
            tags = self.tagger(words)
            losses["upos"] = F.cross_entropy(tags[mask], batch.upos[mask])
            out["upos_scores"] = tags
        return ParserOutput(loss=sum(losses.values()), losses=losses, **out)

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Prediction]:
        """Single-root MST trees with labels, and UPOS tags, for every sentence of ``batch``."""
        words = self.represent(batch)
        lengths = batch.word_mask.sum(1).tolist()
        heads = deprels = upos = [None] * len(lengths)
        if self.parsing:
            log_probs = torch.log_softmax(self.arc_scores(words, batch), dim=-1).cpu().double().numpy()
            tree_heads = torch.zeros_like(batch.heads)
            for b, n in enumerate(lengths):
                tree = decode_mst(log_probs[b, : n + 1, : n + 1])
                tree_heads[b, : n + 1] = torch.from_numpy(tree).clamp(min=0)
            label_scores = self.label(words, tree_heads.to(words.device))
            label_scores[..., ROOT_DEPREL] = float("-inf")
            labels = label_scores.argmax(-1).cpu()
            labels[tree_heads == 0] = ROOT_DEPREL
            heads = [tree_heads[b, 1 : n + 1].tolist() for b, n in enumerate(lengths)]
            deprels = [[DEPRELS[r] for r in labels[b, 1 : n + 1].tolist()] for b, n in enumerate(lengths)]
        if self.tagging:
            tags = self.tagger(words).argmax(-1).cpu()
            upos = [[UPOS[t] for t in tags[b, 1 : n + 1].tolist()] for b, n in enumerate(lengths)]
        return [Prediction(h, d, u) for h, d, u in zip(heads, deprels, upos)]
