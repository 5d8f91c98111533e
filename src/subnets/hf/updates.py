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

from subnets.masks import core
from subnets.masks.compact import train_subnetworks_only
from subnets.masks.subnetwork import SubnetworkSet
from subnets.optim.masked import UpdateMask

SubnetworkModel = nn.Module  # a subnets.hf.SubnetworkModel (not imported here: it imports this module)


def update_mask(model: SubnetworkModel, languages: Iterable[str]) -> UpdateMask | None:
    """What a step on examples of ``languages`` may update (parameter -> boolean mask): the union
    ([union_update_mask][subnets.masks.core.union_update_mask]) of their update masks
    ([update_mask][subnets.masks.core.update_mask]); None (everything) where a language runs the
    whole model or ``apply='forward'``."""
    key = frozenset(languages)
    if key not in model._update_masks:
        apply = model.subnetwork_config.apply
        masks = [core.update_mask(model, model.subnetwork(code), apply) for code in sorted(key)]
        union = core.union_update_mask(masks) if masks else None
        named = dict(model.named_parameters())  # by parameter: the optimizer may name them otherwise
        model._update_masks[key] = (
            None if union is None else UpdateMask({named[n]: m for n, m in union.items()})
        )
    return model._update_masks[key]


def before_optimizer_step(
    model: SubnetworkModel, optimizer: torch.optim.Optimizer | None = None
) -> UpdateMask | None:
    """Call after the backward pass(es) of a step, before clipping and the optimizer step:
    gathers the step's languages (over processes when distributed), zeroes the gradients it
    may not update, feeds the dynamic rule's moving average, and sets ``optimizer.update_mask``
    (a [MaskedOptimizer][subnets.optim.MaskedOptimizer], possibly inside accelerate's wrapper).
    Returns the update mask (None: everything)."""
    if optimizer is not None:
        model._optimizer = optimizer  # train='subnetwork': a re-selection moves its state (train_alone)
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
    core.restrict_gradients(model, mask, optimizer)
    inner = core.masked_optimizer_of(optimizer)
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
    for code in sorted(model.ema.averages):  # the selection of find_subnetworks (SubnetworkConfig.select)
        masks[code] = core.ema_reselect(model.ema, code, model.masks.get(code),
                                        selection="keep_ratio" if config.top_k is None else "top_k",
                                        keep_ratio=config.keep_ratio, top_k=config.top_k,
                                        min_heads_per_layer=config.min_heads_per_layer, units=model.gates.units)  # fmt: skip
    model.set_masks(masks)
    return True


def train_alone(model: SubnetworkModel, masks: SubnetworkSet) -> None:
    """With ``SubnetworkConfig.train='subnetwork'``: train the union of ``masks`` alone
    ([train_subnetworks_only][subnets.masks.compact.train_subnetworks_only]) in the wrapped model's
    ``base_model``, its output embeddings frozen too (as peft's LoRA leaves a language model's output
    layer); a re-selection moves the state of the optimizer last given to ``before_optimizer_step``."""
    if model.subnetwork_config.train != "subnetwork" or not len(masks):
        return
    output = model.model.get_output_embeddings() if hasattr(model.model, "get_output_embeddings") else None
    for parameter in [] if output is None else output.parameters():
        parameter.requires_grad_(False)
    train_subnetworks_only(
        model, masks.values(), model.model.base_model, getattr(model, "_optimizer", None), model.gates
    )


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
