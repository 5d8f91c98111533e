"""The steps of a [SubnetworkModel][subnets.hf.SubnetworkModel]: what a step may update (the union of its
languages' subnetworks), the gradients it zeroes before clipping, the dynamic rule's moving
average of ``|dL/dgate|`` and its re-selections. The model's ``update_mask``,
``before_optimizer_step`` and ``after_optimizer_step`` call these; a training loop calls those::

    loss.backward()
    model.before_optimizer_step(optimizer)     # optimizer: a MaskedOptimizer (subnets.hf.masked_optimizer)
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    model.after_optimizer_step()
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from subnets.masks.subnetwork import Subnetwork, SubnetworkSet, unit_parameter_masks
from subnets.optim.masked import MaskedOptimizer, UpdateMask

SubnetworkModel = nn.Module  # a subnets.hf.SubnetworkModel (not imported here: it imports this module)


def update_mask(model: SubnetworkModel, languages: Iterable[str]) -> UpdateMask | None:
    """What a step on examples of ``languages`` may update (parameter -> boolean mask): the
    weights owned by units in the union of their subnetworks, and every weight no unit owns;
    None (everything) where a language runs the whole model or ``apply='forward'``."""
    key = frozenset(languages)
    if key not in model._update_masks:
        subnetworks = [model.subnetwork(code) for code in sorted(key)]
        if model.subnetwork_config.apply == "forward" or not key or any(s is None for s in subnetworks):
            model._update_masks[key] = None
        else:
            union = torch.stack([s.unit_mask for s in subnetworks]).any(dim=0)
            named = dict(model.named_parameters())
            masks = {
                named[name]: mask for name, mask in unit_parameter_masks(model, union, model.gates).items()
            }
            for s in subnetworks:
                for name, mask in s.param_masks.items():
                    parameter = named[name]
                    masks[parameter] = (
                        masks[parameter] | mask.to(parameter.device) if parameter in masks else mask
                    )
            model._update_masks[key] = UpdateMask(masks)
    return model._update_masks[key]


def before_optimizer_step(
    model: SubnetworkModel, optimizer: torch.optim.Optimizer | None = None
) -> UpdateMask | None:
    """Call after the backward pass(es) of a step, before clipping and the optimizer step:
    gathers the step's languages (over processes when distributed), zeroes the gradients it
    may not update, feeds the dynamic rule's moving average, and sets ``optimizer.update_mask``
    (a [MaskedOptimizer][subnets.optim.MaskedOptimizer], possibly inside accelerate's wrapper).
    Returns the update mask (None: everything)."""
    seen, grads = model._seen, gate_gradients(model._probes)
    model._seen, model._probes = set(), []
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (sorted(seen), {k: v.cpu() for k, v in grads.items()}))
        seen, grads = set(), {}
        for languages, gradients in gathered:
            seen.update(languages)
            for code, grad in gradients.items():
                grads[code] = grads[code] + grad if code in grads else grad
    if model.ema is not None:
        for code in sorted(grads):
            model.ema.update(code, grads[code])
    mask = update_mask(model, seen) if seen else None
    if mask is not None:
        for parameter, keep in mask.items():
            if parameter.grad is not None:
                parameter.grad.mul_(keep)
    inner = _masked_optimizer(optimizer)
    if inner is not None:
        inner.update_mask = mask
    return mask


def after_optimizer_step(model: SubnetworkModel) -> bool:
    """Call after the optimizer step: counts it and, under the dynamic rule, re-selects every
    tracked language's mask each ``update_every`` steps. Returns whether masks changed."""
    model.steps += 1
    config = model.subnetwork_config
    if model.ema is None or model.steps % config.update_every or not model.ema.averages:
        return False
    masks = SubnetworkSet(model.gates.num_layers, model.gates.units)
    for code in model.masks:
        masks[code] = model.masks[code]
    for code in sorted(model.ema.averages):
        scores = model.ema.scores(code)
        chosen = config.select(scores, model.gates.units)
        masks[code] = Subnetwork(chosen, scores=scores)
    model.set_masks(masks)
    return True


def gate_gradients(probes: list[tuple[torch.Tensor, list[str]]]) -> dict[str, torch.Tensor]:
    """``dL/dgate`` per language from the probes of the forwards since the last step."""
    grads: dict[str, torch.Tensor] = {}
    for probe, languages in probes:
        if probe.grad is None:
            continue
        per_example = probe.grad if probe.ndim == 3 else None
        for code in dict.fromkeys(languages):
            if per_example is None:
                grad = probe.grad
            else:
                grad = per_example[[i for i, c in enumerate(languages) if c == code]].sum(dim=0)
            grad = grad.detach().double().cpu()
            grads[code] = grads[code] + grad if code in grads else grad
    return grads


def summary(model: SubnetworkModel) -> dict[str, float]:
    """Sparsity per language and the mean pairwise Jaccard overlap of the masks (for logs)."""
    if not len(model.masks):
        return {}
    out = {f"subnetworks/sparsity/{code}": s.sparsity() for code, s in model.masks.items()}
    codes, overlap = model.masks.jaccard()
    if len(codes) > 1:
        pairs = [overlap[i, j] for i, j in itertools.combinations(range(len(codes)), 2)]
        out["subnetworks/overlap"] = float(sum(pairs) / len(pairs))
    return out


def _masked_optimizer(optimizer) -> MaskedOptimizer | None:
    while optimizer is not None and not isinstance(optimizer, MaskedOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
    return optimizer
