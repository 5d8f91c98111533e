"""Turning importance scores into masks.

* [select_top_k][subnets.masks.selection.select_top_k] /
  [select_keep_ratio][subnets.masks.selection.select_keep_ratio]: keep the highest-scoring heads, at least
  ``min_per_layer`` in every layer (the best of each layer first, then the best of the rest).
* [iterative_pruning][subnets.masks.selection.iterative_pruning] (Prasanna et al. 2020): repeatedly remove the
  lowest-scoring ``fraction`` of the remaining heads, re-scoring under the current mask, and stop when the
  development metric falls below ``threshold`` times the unpruned model's; the result is the
  last mask that stayed at or above it.
* [select_parameters][subnets.masks.selection.select_parameters]: parameter masks from per-coordinate scores
  (Fisher), keeping a fraction of each tensor or of all of them together.

Ties are broken by position (the earlier layer and head wins), so selection is deterministic.

Scores and masks are ``[layers, units]``. With several kinds of unit (heads, then neurons:
``units={"heads": 12, "neurons": 1536}``, the gates' ``units``), every rule applies to each
kind's columns on its own ([per_kind][subnets.masks.selection.per_kind]): a keep ratio keeps that share of the
heads and that share of the neurons, and ``min_per_layer`` holds for each kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Units = Mapping[str, int]  # kind -> units per layer, in column order


def per_kind(function: Callable[[torch.Tensor, slice], torch.Tensor], tensor: torch.Tensor,
             units: Units | None = None) -> torch.Tensor:  # fmt: skip
    """``function(block, columns)`` on each kind's columns of ``tensor`` (``[layers, units]``;
    ``columns`` is the block's slice, to take the same columns of another tensor), the results
    joined again; one call on the whole tensor for a single kind (or ``units=None``)."""
    if units is None or len(units) <= 1:
        return function(tensor, slice(None))
    return torch.cat(
        [function(tensor[:, columns], columns) for columns in kind_columns(units).values()], dim=1
    )


def kind_columns(units: Units) -> dict[str, slice]:
    """Each kind's columns in a ``[layers, units]`` tensor."""
    columns, start = {}, 0
    for kind, count in units.items():
        columns[kind] = slice(start, start + count)
        start += count
    return columns


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Flat indices from the highest to the lowest score, ties by position."""
    return torch.sort(-scores.flatten().double(), stable=True).indices


def select_top_k(
    scores: torch.Tensor, k: int, min_per_layer: int = 1, units: Units | None = None
) -> torch.Tensor:
    """Boolean ``[layers, units]`` mask of the ``k`` best units with at least ``min_per_layer`` per
    layer (one kind of unit: a number of heads says nothing about a number of neurons)."""
    if units is not None and len(units) > 1:
        raise ValueError(f"top_k selects among one kind of unit; these scores hold {' and '.join(units)} "
                         "(use a keep ratio)")  # fmt: skip
    layers, count = scores.shape
    if not layers * min_per_layer <= k <= layers * count:
        raise ValueError(
            f"k={k} must lie between {layers * min_per_layer} (min_per_layer x layers) and {layers * count}"
        )
    mask = torch.zeros(layers, count, dtype=torch.bool)
    for layer in range(layers):
        mask[layer, _order(scores[layer])[:min_per_layer]] = True
    order = _order(scores)
    rest = order[~mask.view(-1)[order]]  # the best first, among those not yet kept
    mask.view(-1)[rest[: k - int(mask.sum())]] = True
    return mask


def select_keep_ratio(
    scores: torch.Tensor, keep_ratio: float, min_per_layer: int = 1, units: Units | None = None
) -> torch.Tensor:
    """[select_top_k][subnets.masks.selection.select_top_k] with ``k = round(keep_ratio * layers * units)``
    (at least the minimum), for each kind of unit."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")

    def select(block: torch.Tensor, columns: slice) -> torch.Tensor:
        layers, count = block.shape
        return select_top_k(
            block, max(layers * min_per_layer, round(keep_ratio * layers * count)), min_per_layer
        )

    return per_kind(select, scores, units)


def prune_lowest(
    scores: torch.Tensor,
    mask: torch.Tensor,
    fraction: float,
    min_per_layer: int = 1,
    units: Units | None = None,
) -> torch.Tensor:
    """Remove the lowest-scoring ``ceil(fraction * remaining)`` units of ``mask`` (at least one),
    never leaving a layer with fewer than ``min_per_layer`` units; for each kind of unit."""
    if units is not None and len(units) > 1:
        return per_kind(lambda block, columns: prune_lowest(block, mask[:, columns], fraction, min_per_layer),
                        scores, units)  # fmt: skip
    mask = mask.clone().bool()
    count = max(1, math.ceil(fraction * int(mask.sum()) - 1e-9))  # 0.55 * 100 is 55.000000000000007
    kept_per_layer = mask.sum(dim=1)
    removed = 0
    for index in reversed(_order(scores).tolist()):
        layer, head = divmod(index, mask.shape[1])
        if removed == count:
            break
        if mask[layer, head] and kept_per_layer[layer] > min_per_layer:
            mask[layer, head] = False
            kept_per_layer[layer] -= 1
            removed += 1
    return mask


@dataclass
class PruningResult:
    """The selected mask, the unpruned metric, and each round's (heads kept, metric)."""

    mask: torch.Tensor
    baseline: float
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped_by: str = ""


def iterative_pruning(
    score: Callable[[torch.Tensor], torch.Tensor],
    metric: Callable[[torch.Tensor], float],
    shape: tuple[int, int],
    *,
    fraction: float = 0.1,
    threshold: float = 0.9,
    min_per_layer: int = 1,
    max_rounds: int | None = None,
    units: Units | None = None,
) -> PruningResult:
    """Prune units until the metric would fall below ``threshold`` x the unpruned metric.

    Args:
        score: mask -> importance ``[layers, units]`` computed under that mask (re-scoring).
        metric: mask -> development metric (higher is better) of the model gated by the mask.
        shape: ``(layers, units)``.
        units: the kinds of unit in the columns (each round prunes ``fraction`` of each kind).
    Returns:
        the last mask whose metric stayed >= ``threshold * metric(all heads)``.
    """
    mask = torch.ones(shape, dtype=torch.bool)
    baseline = metric(mask)
    result = PruningResult(mask.clone(), baseline, [(int(mask.sum()), baseline)])
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        candidate = prune_lowest(score(mask), mask, fraction, min_per_layer, units)
        if torch.equal(candidate, mask):
            result.stopped_by = "minimum heads per layer reached"
            return result
        value = metric(candidate)
        result.history.append((int(candidate.sum()), value))
        if value < threshold * baseline:
            result.stopped_by = f"metric {value:.4g} < {threshold} x {baseline:.4g}"
            return result
        mask = candidate
        result.mask = mask.clone()
        rounds += 1
    result.stopped_by = f"max_rounds={max_rounds}"
    return result


def select_parameters(
    scores: Mapping[str, torch.Tensor], keep_ratio: float, scope: str = "tensor"
) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the highest-scoring ``keep_ratio`` of coordinates, per tensor
    (``scope="tensor"``) or over all tensors together (``scope="global"``)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    if scope == "tensor":
        masks = {}
        for name, s in scores.items():
            k = max(1, round(keep_ratio * s.numel()))
            mask = torch.zeros(s.numel(), dtype=torch.bool)
            mask[_order(s)[:k]] = True
            masks[name] = mask.view(s.shape)
        return masks
    if scope == "global":
        flat = torch.cat([s.flatten().double() for s in scores.values()])
        k = max(1, round(keep_ratio * flat.numel()))
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[_order(flat)[:k]] = True
        masks, start = {}, 0
        for name, s in scores.items():
            masks[name] = keep[start : start + s.numel()].view(s.shape)
            start += s.numel()
        return masks
    raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
