"""Dynamic subnetworks: importance tracked during training, and learned gates.

Two rules keep each language's mask up to date while the model trains:

* [ImportanceEMA][subnets.masks.dynamic.ImportanceEMA] (rule ``ema``): every training step of language ``l``
  already computes ``dL/dgate`` when its gates require grad, so ``l``'s importance is tracked at almost no
  cost as an exponential moving average::

      A_l <- decay * A_l + (1 - decay) * |dL/dgate|

  normalised like the static importance (per-layer L2, global min-max) when masks are
  re-selected ([reselect][subnets.masks.dynamic.reselect]).
* [HardConcreteGates][subnets.masks.dynamic.HardConcreteGates] (rule ``learned``): per-language gate logits
  ``log_alpha`` trained with the model through the hard-concrete relaxation of L0 gates (Louizos et al. 2018,
  as used for heads by Voita et al. 2019), with a penalty pulling the expected share of open
  gates towards a target keep ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from subnets.masks.importance import normalize_importance
from subnets.masks.selection import Units, per_kind, select_keep_ratio, select_top_k


class ImportanceEMA:
    """Exponential moving averages of ``|dL/dgate|`` per language.

    The first update of a language sets its average to that update (no bias towards zero).

    Example::

        ema = ImportanceEMA((12, 12), decay=0.9)
        ema.update("en", gate_grad)
        scores = ema.scores("en")       # normalised [layers, heads]
    """

    def __init__(self, shape: tuple[int, int], decay: float, units: Units | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.shape, self.decay, self.units = tuple(shape), decay, units
        self.averages: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, language: str, gate_grad: torch.Tensor) -> None:
        value = gate_grad.detach().abs().double().cpu()
        if language not in self.averages:
            self.averages[language] = value
        else:
            self.averages[language] = self.decay * self.averages[language] + (1 - self.decay) * value
        self.counts[language] = self.counts.get(language, 0) + 1

    def scores(self, language: str, normalize: bool = True) -> torch.Tensor:
        raw = self.averages[language].float()
        return normalize_importance(raw, self.units) if normalize else raw

    def state_dict(self) -> dict:
        return {"averages": dict(self.averages), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.averages = {k: v.double().cpu() for k, v in state["averages"].items()}
        self.counts = dict(state["counts"])


def select_threshold(
    scores: torch.Tensor,
    threshold: float,
    min_per_layer: int = 1,
    strict: bool = False,
    units: Units | None = None,
) -> torch.Tensor:
    """Units whose (normalised) score reaches ``threshold`` (exceeds it if ``strict``), plus each
    layer's best units up to ``min_per_layer`` (of each kind)."""

    def select(block: torch.Tensor, columns: slice) -> torch.Tensor:
        mask = block > threshold if strict else block >= threshold
        for layer in range(block.shape[0]):
            if int(mask[layer].sum()) < min_per_layer:
                mask[layer, torch.sort(-block[layer].double(), stable=True).indices[:min_per_layer]] = True
        return mask

    return per_kind(select, scores, units)


def reselect(
    scores: torch.Tensor,
    current: torch.Tensor,
    selection: str,
    keep_ratio: float = 0.5,
    top_k: int | None = None,
    threshold: float = 0.3,
    min_per_layer: int = 1,
    units: Units | None = None,
) -> torch.Tensor:
    """A new mask from ``scores`` by ``selection``: ``keep_ratio``, ``top_k``, ``threshold``, or
    ``same_size`` (as many units of each kind as ``current`` keeps)."""
    if selection == "keep_ratio":
        return select_keep_ratio(scores, keep_ratio, min_per_layer, units)
    if selection == "top_k":
        if top_k is None:
            raise ValueError("selection=top_k needs masks.top_k")
        return select_top_k(scores, top_k, min_per_layer, units)
    if selection == "threshold":
        return select_threshold(scores, threshold, min_per_layer, units=units)
    if selection == "same_size":
        return select_same_size(scores, current, min_per_layer, units)
    raise ValueError(f"unknown selection {selection!r} (keep_ratio, top_k, threshold, same_size)")


def select_same_size(
    scores: torch.Tensor, current: torch.Tensor, min_per_layer: int = 1, units: Units | None = None
) -> torch.Tensor:
    """The best units by ``scores``, as many of each kind as ``current`` keeps (at least
    ``min_per_layer`` per layer)."""

    def select(block: torch.Tensor, columns: slice) -> torch.Tensor:
        kept = int(current[:, columns].sum())
        return select_top_k(block, max(kept, block.shape[0] * min_per_layer), min_per_layer)

    return per_kind(select, scores, units)


class HardConcreteGates(nn.Module):
    """Per-language hard-concrete gates over units (Louizos et al. 2018).

    Training samples ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    stretches it to ``(gamma, zeta)`` and clamps to ``[0, 1]``; the gate is differentiable in
    ``log_alpha``. ``P(gate != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``.

    Deterministic mask at evaluation (and for the update masks): the expected number of open
    gates, ``k = round(sum_h P(gate_h != 0))``, kept among the heads with the largest
    ``log_alpha`` (at least ``min_per_layer`` per layer). The share of kept heads thus follows
    the expected share of open gates that the sparsity penalty steers towards its target, and
    which heads are kept follows the learned logits. (A per-head rule such as "open with
    probability > 0.5" would keep all heads or none whenever the logits move together, as
    they do under a penalty on their mean.)

    Args:
        languages: the languages that get gates.
        shape: ``(layers, heads)``.
        init_keep: initial probability of a gate being open (the same for every head).
    """

    def __init__(
        self,
        languages: Iterable[str],
        shape: tuple[int, int],
        init_keep: float = 0.9,
        beta: float = 2 / 3,
        gamma: float = -0.1,
        zeta: float = 1.1,
    ):
        super().__init__()
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        shift = beta * math.log(-gamma / zeta)
        start = math.log(init_keep / (1 - init_keep)) + shift  # P(open) = init_keep
        self.log_alpha = nn.ParameterDict(
            {lang: nn.Parameter(torch.full(shape, start)) for lang in languages}
        )

    def sample(self, language: str) -> torch.Tensor:
        log_alpha = self.log_alpha[language]
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def open_probability(self, language: str) -> torch.Tensor:
        """``P(gate != 0)`` per head (differentiable)."""
        return torch.sigmoid(self.log_alpha[language] - self.beta * math.log(-self.gamma / self.zeta))

    def mask(self, language: str, min_per_layer: int = 1, units: Units | None = None) -> torch.Tensor:
        """The deterministic boolean mask (see the class docstring), for each kind of unit."""
        log_alpha = self.log_alpha[language].detach().cpu()
        open_probability = self.open_probability(language).detach().cpu()

        def select(block: torch.Tensor, columns: slice) -> torch.Tensor:
            layers = block.shape[0]
            expected = round(float(open_probability[:, columns].sum()))
            return select_top_k(
                block, min(block.numel(), max(layers * min_per_layer, expected)), min_per_layer
            )

        return per_kind(select, log_alpha, units)

    def sparsity_penalty(self, language: str, target_keep: float) -> torch.Tensor:
        """``(mean P(gate != 0) - target_keep)^2``."""
        return (self.open_probability(language).mean() - target_keep) ** 2
