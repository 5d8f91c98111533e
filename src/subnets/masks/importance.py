"""Importance of units (attention heads, feed-forward neurons) and parameters, for any gated
encoder and any loss.

Unit importance (for heads: Michel et al. 2019, "Are Sixteen Heads Really Better than One?";
for neurons the same gradient of a gate on the intermediate unit)::

    I[l, u] = sum over batches b of | dL_b / dg[l, u] |        (gates g at the current mask)

then normalised per layer by the L2 norm over the layer's units and globally by min-max to
[0, 1], each kind of unit on its own. Only the gates are differentiated
(``torch.autograd.grad``), so no weight gradient is computed or disturbed, and scoring neurons
costs what scoring heads does: one forward and one backward pass to the gates.

Fisher information (diagonal, empirical)::

    F[theta] = 1/N sum over samples n of (dL_n / dtheta)^2

where each item of ``batches`` is one sample: pass single-sentence batches for the per-example
Fisher. [fisher_per_unit][subnets.masks.importance.fisher_per_unit] sums it over the coordinates each unit
owns.

Both can run on a copy of the model fine-tuned briefly on the language first
([finetuned_copy][subnets.masks.importance.finetuned_copy]; Prasanna et al. 2020 look for subnetworks in a
model that can do the task).

Example (any Hugging Face encoder, any loss)::

    gates = HeadGates(hf_model)                 # or NeuronGates, UnitGates(hf_model, "both")
    scores = unit_importance(hf_model, loader, lambda b: hf_model(**b).loss, gates=gates)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from subnets.masks.selection import Units, per_kind
from subnets.models.gates import UnitGates, gate_probe

LossFn = Callable[[object], torch.Tensor]


def _default_loss(model: nn.Module) -> LossFn:
    return lambda batch: model(batch).loss


def normalize_importance(scores: torch.Tensor, units: Units | None = None) -> torch.Tensor:
    """Per-layer L2 normalisation, then global min-max to [0, 1] (Michel et al. 2019), for
    each kind of unit on its own."""

    def normalize(block: torch.Tensor, columns: slice) -> torch.Tensor:
        block = block / block.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-20)
        low, high = block.min(), block.max()
        return (block - low) / (high - low) if high > low else torch.zeros_like(block)

    return per_kind(normalize, scores, units)


def unit_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn | None = None,
    *,
    gates: UnitGates | None = None,
    mask: torch.Tensor | None = None,
    max_batches: int | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Accumulated ``|dL/dgate|`` per unit, ``[layers, units]`` on the CPU.

    Args:
        model: the model (put in eval mode while scoring, then restored).
        batches: an iterable of batches (a data loader); the first ``max_batches`` are used.
        loss_fn: batch -> scalar loss (default: ``model(batch).loss``).
        gates: the model's [UnitGates][subnets.models.gates.UnitGates] (default: ``model.gates``).
        mask: the gate values to score under (pruned units at 0); default: all units.
        normalize: apply [normalize_importance][subnets.masks.importance.normalize_importance] (else return
            raw sums).
    """
    gates = gates or model.gates
    loss_fn = loss_fn or _default_loss(model)
    weights = next(model.parameters())
    total = torch.zeros(gates.shape, device=weights.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for batch in itertools.islice(batches, max_batches):
            probe = gate_probe(gates.shape, mask, weights)
            with gates.applied(probe):
                loss = loss_fn(batch)
            (grad,) = torch.autograd.grad(loss, probe)
            total += grad.abs()
    finally:
        model.train(was_training)
    total = total.float().cpu()
    return normalize_importance(total, gates.units) if normalize else total


def fisher_information(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn | None = None,
    *,
    parameters: Iterable[str] | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of each parameter over ``batches`` (one sample per item).

    Args:
        parameters: names of the parameters to score (default: all that require grad).
    Returns:
        name -> tensor of the parameter's shape, on the CPU; for a model sharded with FSDP2
        ([subnets.parallel.sharding][]; every process scoring the same batches), each process's
        shards (DTensors): ``full_tensor()`` gives a whole one,
        [fisher_per_unit][subnets.masks.importance.fisher_per_unit] takes them.
    """
    loss_fn = loss_fn or _default_loss(model)
    named = dict(model.named_parameters())
    names = list(parameters) if parameters is not None else [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"no parameters named {missing[:3]} in {type(model).__name__}")
    tensors = [named[n] for n in names]
    sums = [torch.zeros_like(t) for t in tensors]
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in itertools.islice(batches, max_batches):
            if any(isinstance(t, DTensor) for t in tensors):
                grads = _sharded_gradients(model, loss_fn(batch), tensors)
            else:
                grads = torch.autograd.grad(loss_fn(batch), tensors, allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    total += grad.detach() ** 2
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_information: no batches")
    return {n: (s / count).cpu() for n, s in zip(names, sums)}


def _sharded_gradients(model: nn.Module, loss: torch.Tensor, tensors: list[torch.Tensor]) -> list:
    """``d loss / d tensors`` of a model sharded with FSDP2, which gives gradients to its sharded
    parameters only through a backward pass (reduce-scattered: every process must run the same
    batch); the gradients the model held before are put back."""
    held = {p: p.grad for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [t.grad for t in tensors]
    for parameter, grad in held.items():
        parameter.grad = grad
    return grads


def fisher_per_unit(
    fisher: dict[str, torch.Tensor], model: nn.Module, gates: UnitGates | None = None
) -> torch.Tensor:
    """The Fisher information summed over the coordinates each unit owns, ``[layers, units]``.

    A coordinate owned by several units (a grouped key-value head, a weight shared across
    depths) is divided equally among them, so the scores sum to the owned coordinates' total.
    """
    gates = gates or model.gates
    names = {id(p): n for n, p in model.named_parameters()}
    scores = torch.zeros(gates.shape, dtype=torch.float64)
    shares: dict[str, torch.Tensor] = {}  # owners per entry along the owned dimension, over all depths
    for owned in gates.owned:
        name = names[id(owned.parameter)]
        if name in fisher:
            count = torch.full((len(owned.owners),), owned.owners.shape[1], dtype=torch.float64)
            shares[name] = shares[name] + count if name in shares else count
    for owned in gates.owned:
        name = names[id(owned.parameter)]
        if name not in fisher:
            continue
        values = fisher[name]
        values = (values.full_tensor() if isinstance(values, DTensor) else values).double()
        per_entry = (
            values.movedim(owned.dim, 0).reshape(values.shape[owned.dim], -1).sum(dim=1) / shares[name]
        )
        k = owned.owners.shape[1]
        scores[owned.layer].index_add_(0, owned.owners.flatten(), per_entry.repeat_interleave(k))
    return scores.float()


def finetuned_copy(
    model: nn.Module,
    batches: Iterable,
    steps: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` trained for ``steps`` steps on ``batches`` (cycled).

    ``make_optimizer(copy)`` builds the optimizer (default: AdamW, lr 1e-4);
    ``loss_fn(copy, batch)`` gives the loss (default: ``copy(batch).loss``). Gradients are
    clipped to norm 5. The original model is not changed.
    """
    clone = copy.deepcopy(model)
    if steps <= 0:
        return clone
    loss_fn = loss_fn or (lambda m, batch: m(batch).loss)
    trainable = [p for p in clone.parameters() if p.requires_grad]
    optimizer = make_optimizer(clone) if make_optimizer else torch.optim.AdamW(trainable, lr=1e-4)
    clone.train()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(clone, batch).backward()
        nn.utils.clip_grad_norm_(trainable, 5.0)
        optimizer.step()
    return clone
