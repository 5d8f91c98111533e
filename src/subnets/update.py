"""The update every step shares (mask, clip, finite check, masked step, schedule), one training
step on a batch, the runner's parameter groups and schedule, and the divergence guard."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from subnets.data.batching import Batch
from subnets.distributed import DataParallel
from subnets.models.parser import DependencyParser

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
    language: str = ""  # the step's language (the first of a meta-learning episode)
    skipped: bool = False  # the loss or the gradient was NaN or infinite: nothing was updated


@dataclass
class DivergenceGuard:
    """Flags log intervals whose mean training loss exceeds ``factor`` times the best interval
    mean so far; :meth:`check` says when ``patience`` intervals in a row were flagged.

    The NaN/inf guard of :func:`training_step` catches non-finite values only; a loss that
    climbs from 0.5 to 500 and stays finite is caught here. ``factor <= 0`` switches it off.
    """

    factor: float = 10.0
    patience: int = 3
    best: float | None = None  # the lowest interval mean so far
    best_step: int = 0
    in_a_row: int = 0  # flagged intervals in a row, ending at the latest
    streak_start: int = 0  # the step of the first interval of the current streak
    flagged: int = 0  # flagged intervals in the whole run

    def check(self, step: int, loss: float) -> bool:
        """Record the mean loss of the interval ending at ``step``; returns whether it is flagged."""
        if self.factor <= 0 or loss != loss:  # off, or a NaN mean (the NaN guard's business)
            return False
        if self.best is not None and loss > self.factor * self.best:
            self.in_a_row += 1
            self.flagged += 1
            if self.in_a_row == 1:
                self.streak_start = step
            return True
        self.in_a_row = 0
        if self.best is None or loss < self.best:
            self.best, self.best_step = loss, step
        return False

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` intervals in a row were flagged."""
        return self.factor > 0 and self.in_a_row >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "in_a_row": self.in_a_row,
                "streak_start": self.streak_start, "flagged": self.flagged}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class LossGuard:
    """Stops a run whose training loss goes wrong, with an error that names the steps and the
    last good checkpoint: ``max_nonfinite`` steps in a row skipped for a NaN or infinite loss
    or gradient (:meth:`after_step`), or ``divergence`` flagging its ``patience`` log
    intervals in a row (:meth:`after_interval`; each flagged interval is logged as a warning).

    Args:
        where: the run (its folder), named in the errors.
        last_good: returns the description of the last good checkpoint ("none was written").
    """

    def __init__(
        self, where: object, max_nonfinite: int, divergence: DivergenceGuard, last_good: Callable[[], str]
    ):
        self.where, self.max_nonfinite, self.divergence, self.last_good = (
            where,
            max_nonfinite,
            divergence,
            last_good,
        )
        self.nonfinite_in_a_row = 0

    def after_step(self, step: int, result: StepResult) -> None:
        if not result.skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        log.warning("step %d (%s): loss %s, gradient norm %s; the step was skipped",
                    step, result.language, result.loss, result.grad_norm)  # fmt: skip
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise FloatingPointError(
                f"{self.where}: {self.nonfinite_in_a_row} steps in a row (steps {step - self.nonfinite_in_a_row + 1}"
                f"-{step}, train.max_nonfinite_steps={self.max_nonfinite}) had a NaN or infinite loss or gradient; "
                f"the last good checkpoint is {self.last_good()}. Lower the learning rates (train.lr_encoder, "
                "train.lr_head) or check the data."
            )

    def after_interval(self, step: int, loss: float) -> None:
        guard = self.divergence
        if not guard.check(step, loss):
            return
        factor = guard.factor
        log.warning("step %d: training loss %.4g is more than %g times its best %.4g (step %d): diverging?",
                    step, loss, factor, guard.best, guard.best_step)  # fmt: skip
        if guard.exhausted:
            raise FloatingPointError(
                f"{self.where}: the training loss diverged: {guard.in_a_row} log intervals in a row (steps "
                f"{guard.streak_start}-{step}) above {factor:g} x its best {guard.best:.4g} (step "
                f"{guard.best_step}); the last was {loss:.4g} (train.divergence_factor={factor:g}, "
                f"train.divergence_patience={guard.patience}). The last good checkpoint is {self.last_good()}. "
                "Lower the learning rates (train.lr_encoder, train.lr_head, meta.inner_lr_*) or check the data."
            )


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
    clipping, and the optimizer (a :class:`~subnets.optim.MaskedOptimizer`) leaves those
    coordinates bit-identical. A non-finite loss or gradient norm updates nothing (no optimizer
    or scheduler step; the gradients are cleared). Returns the gradient norm before clipping
    and whether the step was skipped.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if update_mask is not None:
        named = dict(model.named_parameters())
        for name, mask in update_mask.items():
            grad = named[name].grad
            if grad is not None:
                grad.mul_(mask)
    if clip_norm and clip_norm > 0:
        grad_norm = nn.utils.clip_grad_norm_(parameters, clip_norm)
    else:
        grads = [p.grad for p in parameters if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
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
    gates: torch.Tensor | None = None,
    track_gates: bool = False,
    update_mask: Mapping[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    parallel: DataParallel | None = None,
    also_average: Sequence[torch.Tensor] = (),
) -> StepResult:
    """Forward, backward and :func:`apply_update` on one batch, or on the micro-batches of one
    batch of one language (gradients accumulated with each part's loss weighted by its share of
    the words, so the step is the whole batch's up to rounding).

    Args:
        gates: head gates ``[layers, heads]`` for the forward pass (None: all heads, no hooks cost).
        track_gates: return ``dL/dgate`` (the gates, or all-ones, are made differentiable).
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
    micro = [batch] if isinstance(batch, Batch) else list(batch)
    batch, words = micro[0], sum(b.num_words for b in micro)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if track_gates:
        gates = torch.ones(model.gates.shape) if gates is None else gates.detach().float().clone()
        gates = gates.to(batch.input_ids.device).requires_grad_(True)
    loss, losses = 0.0, {}
    for i, part in enumerate(micro):
        with model.gates.applied(gates):
            out = model(part)
        share = part.num_words / words  # the loss is a mean over words: the weighted sum is the batch's
        part_loss = out.loss * share
        (part_loss + extra_loss() if extra_loss is not None and i == 0 else part_loss).backward()
        loss = loss + out.loss.detach().reshape(1) * share
        for k, v in out.losses.items():
            losses[k] = losses.get(k, 0.0) + v.detach().reshape(1) * share
    if parallel is not None and parallel.world_size > 1:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in [*parameters, *also_average] if p.grad is not None]
        probes = [gates.grad] if track_gates else []
        words = int(round(parallel.average([*grads, *probes, loss, *losses.values()], words)))
    grad_norm, skipped = apply_update(
        model, optimizer, loss, update_mask=update_mask, clip_norm=clip_norm, scheduler=scheduler
    )
    gate_grads = {batch.lang: gates.grad.detach().clone()} if track_gates and not skipped else {}
    return StepResult(
        language=batch.lang,
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
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, decay: bool = True
):
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps`` (or constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
