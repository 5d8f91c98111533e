"""The update every step shares (mask, clip, finite check, masked step, schedule), one training
step on a batch, the runner's parameter groups and schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from subnets.data.batching import Batch
from subnets.masks.core import restrict_gradients
from subnets.models.gates import gate_probe
from subnets.models.parser import DependencyParser
from subnets.parallel.distributed import DataParallel

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step did: losses, the gradient norm before clipping, and ``dL/dgate`` per
    language where it was tracked (a batch: its language; a MAML episode: its tasks')."""

    loss: float
    losses: dict[str, float]
    grad_norm: float
    words: int
    gate_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    language: str = ""  # the step's language (the first of a meta-learning episode or a mixed batch)
    skipped: bool = False  # the loss or the gradient was NaN or infinite: nothing was updated


def _finite(*values: torch.Tensor | float) -> bool:
    """Whether every value is finite (neither NaN nor infinite)."""
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor | float,
    *,
    update_mask: Mapping[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[float, bool]:
    """The update after a backward pass, shared by every step (a batch, a MAML episode, a
    few-shot fine-tuning step): mask the gradients, clip their global norm, check that the
    loss and the norm are finite, take the (masked) optimizer step, advance the schedule.

    Gradients outside ``update_mask`` (parameter name -> boolean tensor) are zeroed before
    clipping ([restrict_gradients][subnets.masks.core.restrict_gradients]), and the optimizer (a
    [MaskedOptimizer][subnets.optim.MaskedOptimizer]) leaves those coordinates bit-identical. A non-finite loss or gradient norm updates nothing (no optimizer
    or scheduler step; the gradients are cleared). Returns the gradient norm before clipping
    and whether the step was skipped.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    restrict_gradients(model, update_mask, optimizer)
    if clip_norm and clip_norm > 0:
        grad_norm = nn.utils.clip_grad_norm_(parameters, clip_norm)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(grad_norm, DTensor):  # sharded parameters: the norm over every process's shards
        grad_norm = grad_norm.full_tensor()
    skipped = not _finite(loss, grad_norm)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    elif update_mask is None:
        optimizer.step()
    else:
        optimizer.step(update_mask=update_mask)
    if scheduler is not None and not skipped:
        scheduler.step()
    return float(grad_norm), skipped


def training_step(
    model: DependencyParser,
    batch: Batch | Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    gates: torch.Tensor | Mapping[str, torch.Tensor | None] | None = None,
    track_gates: bool = False,
    update_mask: Mapping[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    parallel: DataParallel | None = None,
    also_average: Sequence[torch.Tensor] = (),
) -> StepResult:
    """Forward, backward and [apply_update][subnets.training.update.apply_update] on one batch, or on the parts of one
    batch (gradients accumulated with each part's loss weighted by its share of the words, so the step
    is the whole batch's up to rounding): micro-batches of one language, or the languages of a
    mixed batch, each through its own gates.

    Args:
        gates: unit gates ``[layers, units]`` for the forward pass (None: all units, no hooks
            cost), or one per language (``{lang: gates}``) for the parts of a mixed batch.
        track_gates: return ``dL/dgate`` per language (the gates, or all-ones, are made differentiable).
        update_mask: parameter name -> boolean tensor of the coordinates this step may update.
        clip_norm: clip the global gradient norm to this value (None or <= 0: no clipping).
        extra_loss: a term added to the task loss before the backward pass (e.g. a sparsity
            penalty on learned gates); ``gates`` that already require grad are used as given.
        parallel: data parallelism: average the gradients, ``dL/dgate`` and the loss over
            processes, weighted by words, before clipping and updating; and the gradients of
            ``also_average`` (parameters outside ``optimizer``, e.g. learned gate logits).

    A step whose loss or gradient norm is NaN or infinite updates nothing and returns
    ``skipped=True``.
    """
    micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    words = sum(b.num_words for b in micro)
    languages = list(gates) if isinstance(gates, Mapping) else list(dict.fromkeys(b.lang for b in micro))
    gate_of = dict(gates) if isinstance(gates, Mapping) else {lang: gates for lang in languages}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if track_gates:
        weights = next(model.parameters())
        gate_of = {lang: gate_probe(model.gates.shape, gate_of[lang], weights) for lang in languages}
    distributed = parallel is not None and parallel.world_size > 1
    scale = 1.0
    if distributed and parallel.sharded:
        # FSDP2 averages the gradients over processes with equal weights: scale each process's
        # loss by its share of the batch's words, so that the average is the combined batch's
        total = torch.tensor([float(words)])
        parallel.sum([total])
        scale = words * parallel.world_size / float(total)
    loss, losses = 0.0, {}
    for i, part in enumerate(micro):
        # the backward pass too under the part's gates: activation checkpointing reruns the forward
        with model.gates.applied(gate_of[part.lang]):
            out = model(part)
            share = part.num_words / words  # the loss is a mean over words: the weighted sum is the batch's
            part_loss = out.loss * share
            (
                scale * (part_loss + extra_loss() if extra_loss is not None and i == 0 else part_loss)
            ).backward()
        loss = loss + out.loss.detach().reshape(1) * share
        for k, v in out.losses.items():
            losses[k] = losses.get(k, 0.0) + v.detach().reshape(1) * share
    probes = []
    if track_gates:  # a language with no sentence on this process contributes zeros
        for probe in gate_of.values():
            if probe.grad is None:
                probe.grad = torch.zeros_like(probe)
            probes.append(probe.grad)
    if distributed and parallel.sharded:  # FSDP2 averages the gradients of sharded parameters
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        whole = [
            p.grad for p in [*parameters, *also_average] if p.grad is not None and not isinstance(p, DTensor)
        ]
        parallel.mean([*whole, *probes])
        words = int(round(parallel.average([loss, *losses.values()], words)))
    elif distributed:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in [*parameters, *also_average] if p.grad is not None]
        words = int(round(parallel.average([*grads, *probes, loss, *losses.values()], words)))
    grad_norm, skipped = apply_update(
        model, optimizer, loss, update_mask=update_mask, clip_norm=clip_norm, scheduler=scheduler
    )
    gate_grads = (
        {lang: probe.grad.detach().clone() for lang, probe in gate_of.items()}
        if track_gates and not skipped
        else {}
    )
    return StepResult(
        language=languages[0],
        loss=float(loss),
        losses={k: float(v) for k, v in losses.items()},
        grad_norm=grad_norm,
        words=words,
        gate_grads=gate_grads,
        skipped=skipped,
    )


def parameter_groups(
    model: DependencyParser, lr_encoder: float, lr_head: float, weight_decay: float
) -> list[dict]:
    """AdamW groups: encoder and task head at their own learning rates; no decay on biases,
    LayerNorm weights and the scalar mix."""
    encoder_ids = {id(p) for _, p in model.encoder_parameters()}
    groups: dict[tuple[bool, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_encoder = id(parameter) in encoder_ids
        decay = parameter.ndim >= 2 and "LayerNorm" not in name and "layer_norm" not in name
        group = groups.setdefault(
            (is_encoder, decay),
            {
                "params": [],
                "names": [],
                "lr": lr_encoder if is_encoder else lr_head,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'encoder' if is_encoder else 'head'}{'' if decay else '_no_decay'}",
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, decay: bool = True,
    restart_at: int | None = None,
):  # fmt: skip
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps`` (or
    constant). With ``restart_at`` (below ``total_steps``), two such schedules: one over the
    first ``restart_at`` steps and one over the rest (LT-SFT's two phases, each its own training)."""

    def phase(step: int, length: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay:
            return 1.0
        return max(0.0, (length - step) / max(1, length - warmup_steps))

    def factor(step: int) -> float:
        if restart_at is None or not 0 < restart_at < total_steps:
            return phase(step, total_steps)
        return (
            phase(step, restart_at)
            if step < restart_at
            else phase(step - restart_at, total_steps - restart_at)
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
