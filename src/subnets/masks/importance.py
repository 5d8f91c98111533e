"""Importance of attention heads and parameters, for any gated encoder and any loss.

Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?")::

    I[l, h] = sum over batches b of | dL_b / dg[l, h] |        (gates g at the current mask)

then normalised per layer by the L2 norm over the layer's heads and globally by min-max to
[0, 1]. Only the gates are differentiated (``torch.autograd.grad``), so no weight gradient is
computed or disturbed.

Fisher information (diagonal, empirical)::

    F[theta] = 1/N sum over samples n of (dL_n / dtheta)^2

where each item of ``batches`` is one sample: pass single-sentence batches for the per-example
Fisher. :func:`fisher_per_head` sums it over the coordinates each head owns.

Both can run on a copy of the model fine-tuned briefly on the language first
(:func:`finetuned_copy`; Prasanna et al. 2020 look for subnetworks in a model that can do the task).

Example (any Hugging Face encoder, any loss)::

    gates = HeadGates(hf_model)
    scores = head_importance(hf_model, loader, lambda b: hf_model(**b).loss, gates=gates)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from subnets.models.head_gates import HeadGates

LossFn = Callable[[object], torch.Tensor]


def _default_loss(model: nn.Module) -> LossFn:
    return lambda batch: model(batch).loss


def normalize_importance(scores: torch.Tensor) -> torch.Tensor:
    """Per-layer L2 normalisation, then global min-max to [0, 1] (Michel et al. 2019)."""
    scores = scores / scores.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-20)
    low, high = scores.min(), scores.max()
    return (scores - low) / (high - low) if high > low else torch.zeros_like(scores)


def head_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn | None = None,
    *,
    gates: HeadGates | None = None,
    mask: torch.Tensor | None = None,
    max_batches: int | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Accumulated ``|dL/dgate|`` per head, ``[layers, heads]`` on the CPU.

    Args:
        model: the model (put in eval mode while scoring, then restored).
        batches: an iterable of batches (a data loader); the first ``max_batches`` are used.
        loss_fn: batch -> scalar loss (default: ``model(batch).loss``).
        gates: the model's :class:`HeadGates` (default: ``model.gates``).
        mask: the gate values to score under (pruned heads at 0); default: all heads.
        normalize: apply :func:`normalize_importance` (else return raw sums).
    """
    gates = gates or model.gates
    loss_fn = loss_fn or _default_loss(model)
    device = next(model.parameters()).device
    values = (torch.ones(gates.shape) if mask is None else mask.detach().float()).to(device)
    total = torch.zeros(gates.shape, device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for batch in itertools.islice(batches, max_batches):
            probe = values.clone().requires_grad_(True)
            with gates.applied(probe):
                loss = loss_fn(batch)
            (grad,) = torch.autograd.grad(loss, probe)
            total += grad.abs()
    finally:
        model.train(was_training)
    total = total.float().cpu()
    return normalize_importance(total) if normalize else total


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
        name -> tensor of the parameter's shape, on the CPU.
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


def fisher_per_head(
    fisher: dict[str, torch.Tensor], model: nn.Module, gates: HeadGates | None = None
) -> torch.Tensor:
    """Sum of the Fisher information over each head's coordinates: rows of its query, key and
    value weights and biases, columns of its output projection; ``[layers, heads]``."""
    gates = gates or model.gates
    names = {id(p): n for n, p in model.named_parameters()}
    heads, d = gates.num_heads, gates.head_dim
    scores = torch.zeros(gates.shape)
    for layer, modules in enumerate(gates.layers):
        for role in ("query", "key", "value"):
            for tensor in (modules[role].weight, modules[role].bias):
                if tensor is not None and names[id(tensor)] in fisher:
                    per_row = fisher[names[id(tensor)]].reshape(heads * d, -1).sum(dim=1)
                    scores[layer] += per_row.reshape(heads, d).sum(dim=1)
        output = names[id(modules["output"].weight)]
        if output in fisher:
            scores[layer] += fisher[output].reshape(-1, heads, d).sum(dim=(0, 2))
    return scores


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
