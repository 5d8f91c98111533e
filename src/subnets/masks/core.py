"""What a language's subnetwork decides in a training step: the one definition behind the runner's
subnetwork policies ([subnets.methods.subnetworks][]) and the Hugging Face wrapper (``subnets.hf``).

* [gate_values][subnets.masks.core.gate_values] and [update_mask][subnets.masks.core.update_mask]: a
  language's forward gates and the coordinates its steps may update, by ``apply`` (``forward``,
  ``gradient`` or ``both``);
* [union_update_mask][subnets.masks.core.union_update_mask]: what a step of several languages may update;
* [random_control][subnets.masks.core.random_control] and
  [random_subnetwork][subnets.masks.core.random_subnetwork]: the random control, as a transform of any mask
  set (and a random mask of given counts for one language);
* [ema_reselect][subnets.masks.core.ema_reselect]: the dynamic rule's re-selection of a language's mask
  from its moving average of ``|dL/dgate|``;
* [restrict_gradients][subnets.masks.core.restrict_gradients]: the gradients a step may not use zeroed,
  before clipping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from subnets.masks.compact import subnetwork_parameters
from subnets.masks.controls import generator, random_like, random_mask_like
from subnets.masks.dynamic import ImportanceEMA, reselect
from subnets.masks.selection import Units
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet, unit_parameter_masks
from subnets.optim.masked import MaskedOptimizer, UpdateMask
from subnets.parallel.sharding import local, local_mask


def gate_values(subnetwork: Subnetwork | None, apply: str) -> torch.Tensor | None:
    """The forward gates ``[layers, units]`` (on the CPU) of a step through ``subnetwork``: its unit
    mask as floats; None (every unit) without a subnetwork or under ``apply='gradient'``."""
    if subnetwork is None or apply == "gradient":
        return None
    return subnetwork.unit_mask.float()


def update_mask(model: nn.Module, subnetwork: Subnetwork | None, apply: str) -> UpdateMask | None:
    """What a step through ``subnetwork`` may update, by parameter names of ``model`` (whose
    ``.gates`` own the units), on the model's device: the weights its units own
    ([unit_parameter_masks][subnets.masks.subnetwork.unit_parameter_masks]), where its parameter masks
    stand in for them, and every parameter neither covers; None (everything) without a subnetwork or
    under ``apply='forward'``. Where only the subnetworks train
    ([train_subnetworks_only][subnets.masks.compact.train_subnetworks_only]), the masks of their values."""
    if subnetwork is None or apply == "forward":
        return None
    trained = subnetwork_parameters(model)
    if trained is not None:  # only the subnetworks train: masks of their values
        return UpdateMask(trained.update_mask(subnetwork))
    device = next(model.parameters()).device
    masks = unit_parameter_masks(model, subnetwork.unit_mask.to(device))
    for name, mask in subnetwork.param_masks.items():
        masks[name] = mask.to(device)
    return UpdateMask(masks)  # planned once by the masked optimizer


def union_update_mask(masks: Sequence[Mapping | None]) -> Mapping | None:
    """What a step of several languages may update, from their update masks: a coordinate any of
    them lets move (None: everything, where one of them is None; a parameter missing from one of
    them is free)."""
    if any(m is None for m in masks) or len(masks) == 1:
        return None if any(m is None for m in masks) else masks[0]
    shared = [name for name in masks[0] if all(name in m for m in masks[1:])]
    return UpdateMask({name: torch.stack([m[name] for m in masks]).any(dim=0) for name in shared})


def random_control(masks: SubnetworkSet, seed: int) -> SubnetworkSet:
    """The random control of ``masks``: every language's mask replaced by a random one with its
    counts in every layer and kind of unit, and in every parameter mask, drawn from a generator of
    ``seed`` and the language ([random_like][subnets.masks.controls.random_like]): only the counts,
    the seed and the language matter."""
    return random_like(masks, seed)


def random_subnetwork(
    template: torch.Tensor, language: str, seed: int, units: Units | None = None
) -> Subnetwork:
    """A random subnetwork of ``language`` with ``template``'s count in every layer and kind of unit
    (a float template, e.g. the mean of several masks or a share, gives the rounded counts), drawn as
    [random_control][subnets.masks.core.random_control] draws it."""
    return Subnetwork(random_mask_like(template, generator(seed, f"random/{language}"), units))


def ema_reselect(ema: ImportanceEMA, language: str, current: Subnetwork | None, *, selection: str = "keep_ratio",
                 keep_ratio: float = 0.5, top_k: int | None = None, threshold: float = 0.3,
                 min_heads_per_layer: int = 1, units: Units | None = None) -> Subnetwork | None:  # fmt: skip
    """The dynamic rule's new subnetwork of ``language``: its mask re-selected
    ([reselect][subnets.masks.dynamic.reselect]: ``selection`` with ``keep_ratio``, ``top_k``,
    ``threshold``, ``min_heads_per_layer``) from the normalised moving average of its ``|dL/dgate|``
    in ``ema``, with ``current``'s parameter masks; ``current`` where ``ema`` has no step of it."""
    if language not in ema.averages:
        return current
    scores = ema.scores(language)
    mask = reselect(scores, None if current is None else current.unit_mask, selection, keep_ratio, top_k,
                    threshold, min_heads_per_layer, units)  # fmt: skip
    return Subnetwork(mask, {} if current is None else current.param_masks, scores)


def masked_optimizer_of(optimizer: torch.optim.Optimizer | None) -> MaskedOptimizer | None:
    """The [MaskedOptimizer][subnets.optim.MaskedOptimizer] ``optimizer`` is or wraps (e.g. inside
    accelerate's ``AcceleratedOptimizer``), or None."""
    while optimizer is not None and not isinstance(optimizer, MaskedOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def restrict_gradients(
    model: nn.Module, mask: Mapping | None, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Zero the gradient coordinates of ``model`` a step may not update (outside ``mask``: parameter
    name or tensor -> boolean tensor), before clipping, so that the norm counts only what the step
    updates: by the plan of the [MaskedOptimizer][subnets.optim.MaskedOptimizer] ``optimizer`` is or
    wraps, else by multiplying each gradient (its shard, for a sharded parameter) with its mask."""
    if mask is None:
        return
    masked = masked_optimizer_of(optimizer)
    if masked is not None:
        masked.mask_gradients(mask)
        return
    named = dict(model.named_parameters())
    for key, keep in mask.items():
        grad = (named[key] if isinstance(key, str) else key).grad
        if grad is not None:
            local(grad).mul_(local_mask(keep, grad))
