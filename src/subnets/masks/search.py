"""Finding one language's subnetwork: importance, then selection (the static procedure).

``find_subnetwork`` strings together the pieces of [subnets.masks.importance][] and
[subnets.masks.selection][] the way the static method uses them, and can be called on its
own on any gated model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from subnets.masks.importance import finetuned_copy, fisher_information, fisher_per_unit, unit_importance
from subnets.masks.selection import (
    PruningResult,
    iterative_pruning,
    select_keep_ratio,
    select_parameters,
    select_top_k,
)
from subnets.masks.subnetwork import Subnetwork


@dataclass
class SubnetworkSearch:
    """The subnetwork found, the normalised unit importance under all units, and the pruning
    history (``selection="iterative"``)."""

    subnetwork: Subnetwork
    importance: torch.Tensor
    pruning: PruningResult | None = None
    halves: tuple[torch.Tensor, torch.Tensor] | None = None  # importance of the even and odd batches


def matching_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of ``model``'s parameters matching any of the regular expressions ``patterns``."""
    compiled = [re.compile(p) for p in patterns]
    return [name for name, _ in model.named_parameters() if any(c.search(name) for c in compiled)]


def find_subnetwork(
    model: nn.Module,
    batches: Sequence,
    *,
    importance: str = "head",
    selection: str = "iterative",
    dev_metric: Callable[[nn.Module, torch.Tensor], float] | None = None,
    keep_ratio: float = 0.5,
    top_k: int | None = None,
    prune_fraction: float = 0.1,
    threshold: float = 0.9,
    min_heads_per_layer: int = 1,
    samples: Sequence | None = None,
    finetune_batches: Sequence | None = None,
    finetune_steps: int = 0,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    param_names: Sequence[str] = (),
    param_keep_ratio: float = 0.5,
    param_scope: str = "tensor",
    split_half: bool = False,
    scores: torch.Tensor | None = None,
    score_halves: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SubnetworkSearch:
    """One language's subnetwork of ``model`` (a module with ``.gates`` whose ``model(batch).loss``
    is the task loss).

    Args:
        batches: the language's batches for unit importance.
        importance: ``"head"`` (|dL/dgate| of each unit the gates cover, heads or neurons) or
            ``"fisher"`` (Fisher information summed over the coordinates each unit owns,
            from ``samples``: single-sentence batches) or ``"activation"`` (feed-forward neurons
            by how language-specific their activation is, [subnets.masks.activation][]: ``scores``,
            measured for every language at once, as the languages are compared; not re-scored
            under a pruned mask, and with no fine-tuned copy).
        selection: ``"iterative"`` (needs ``dev_metric(model, mask)``), ``"keep_ratio"`` or ``"top_k"``.
        finetune_steps: if > 0, score a copy of the model first trained for that many steps
            on ``finetune_batches`` (with ``make_optimizer(copy)``, default AdamW 1e-4).
        param_names: parameters that also get unstructured masks from the Fisher information
            of ``samples`` (keeping ``param_keep_ratio`` per tensor or globally).
        split_half: also score the even and the odd ``batches`` apart (``halves``, for
            [split_half_agreement][subnets.masks.controls.split_half_agreement]; gate-gradient importance
            only; with ``importance="activation"``, ``score_halves``: the scores of the two halves).
        scores: the language's unit scores, for ``importance="activation"``
            ([language_neurons][subnets.masks.activation.language_neurons]).
    """
    scorer = model
    if importance == "activation" and scores is None:
        raise ValueError("importance='activation' needs the language's scores (subnets.masks.activation."
                         "language_neurons, which measures every language together)")  # fmt: skip
    if finetune_steps > 0 and importance != "activation":
        scorer = finetuned_copy(model, finetune_batches or batches, finetune_steps, make_optimizer)
    gates = scorer.gates

    def score(mask: torch.Tensor | None) -> torch.Tensor:
        if importance == "head":
            return unit_importance(scorer, batches, mask=mask)
        if importance == "fisher":
            if not samples:
                raise ValueError("importance='fisher' needs single-sentence samples")
            values = None if mask is None else mask.float().to(next(scorer.parameters()).device)

            def loss(batch):
                with gates.applied(values):
                    return scorer(batch).loss

            owned = {id(p) for p in gates.owned_parameters()}
            names = [n for n, p in scorer.named_parameters() if id(p) in owned]
            return fisher_per_unit(fisher_information(scorer, samples, loss, parameters=names), scorer)
        if importance == "activation":
            return scores
        raise ValueError(f"importance must be 'head', 'fisher' or 'activation', got {importance!r}")

    full_scores = score(None)
    pruning = None
    if selection == "iterative":
        if dev_metric is None:
            raise ValueError("selection='iterative' needs a development metric (dev_metric)")
        pruning = iterative_pruning(
            lambda mask: full_scores if bool(mask.all()) else score(mask),
            lambda mask: dev_metric(scorer, mask),
            gates.shape,
            fraction=prune_fraction,
            threshold=threshold,
            min_per_layer=min_heads_per_layer,
            units=gates.units,
        )
        unit_mask = pruning.mask
    elif selection == "keep_ratio":
        unit_mask = select_keep_ratio(full_scores, keep_ratio, min_heads_per_layer, gates.units)
    elif selection == "top_k":
        if top_k is None:
            raise ValueError("selection='top_k' needs top_k (masks.top_k)")
        unit_mask = select_top_k(full_scores, top_k, min_heads_per_layer, gates.units)
    else:
        raise ValueError(f"selection must be 'iterative', 'keep_ratio' or 'top_k', got {selection!r}")

    param_masks = {}
    if param_names:
        if not samples:
            raise ValueError("parameter masks need single-sentence samples for the Fisher information")
        fisher = fisher_information(scorer, samples, parameters=list(param_names))
        param_masks = select_parameters(fisher, param_keep_ratio, param_scope)
    normalized = (
        full_scores / full_scores.max() if importance == "fisher" and full_scores.max() > 0 else full_scores
    )
    halves = None
    if split_half and importance == "head" and len(batches) >= 2:
        halves = (unit_importance(scorer, batches[0::2]), unit_importance(scorer, batches[1::2]))
    elif split_half and importance == "activation":
        halves = score_halves
    return SubnetworkSearch(Subnetwork(unit_mask, param_masks), normalized, pruning, halves)
