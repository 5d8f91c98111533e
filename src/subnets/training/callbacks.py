"""What the training loop does besides training, as small callbacks: the loss guard, the
development evaluation, the method's end-of-training hook, the gradient-conflict analysis and
the checkpoint. [subnets.training.runner.Run.train][] calls each in order after every step (and,
for the guard, after every log interval) with a [Loop][subnets.training.callbacks.Loop], the loop's view
of the run (its step, its place in a ``torchrun`` job, and what a callback may ask of it); each
says when it acts from its own settings.

A callback of your own has the same three hooks (each optional) and goes into
``Run.callbacks``::

    class StopAtLoss(Callback):
        def after_step(self, loop, result):
            if result.loss < 0.01:
                raise StopIteration
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subnets.progress import Clock
from subnets.training.guards import LossGuard
from subnets.training.update import StepResult

log = logging.getLogger(__name__)


@dataclass
class Loop:
    """The training loop as a callback sees it.

    Attributes: ``steps`` (the last step, ``train.steps``), ``is_main`` (rank 0), ``evaluates``
    (this process takes part in evaluations: rank 0, or every process of a sharded run),
    ``validate`` (the development evaluation now; returns its metric and keeps the best model),
    ``save`` (the last checkpoint now), ``log`` (a record at this step to metrics.jsonl and W&B),
    ``clock`` (seconds per phase, for results.json); ``step`` is the step just done."""

    current_step: Callable[[], int]
    steps: int
    is_main: bool
    evaluates: bool
    validate: Callable[[], float | None]
    save: Callable[[], Path]
    log: Callable[[dict[str, Any]], None]
    clock: Clock

    @property
    def step(self) -> int:
        return self.current_step()


class Callback:
    """Hooks of the training loop (each a no-op here)."""

    def on_start(self, loop: Loop) -> None:
        """Before the first step of this process (step 0, or the step a resume starts from)."""

    def after_step(self, loop: Loop, result: StepResult) -> None:
        """After step ``loop.step`` (its update, the policy's after-step hook and logging are done)."""

    def after_interval(self, loop: Loop, record: dict[str, float]) -> None:
        """After the log interval ending at ``loop.step`` (``record``: its mean losses)."""


class Guard(Callback):
    """Stops a run whose loss diverges ([LossGuard][subnets.training.guards.LossGuard]; the step itself
    checks its loss for NaN and infinities, [train_step][subnets.training.runner.Run.train_step])."""

    def __init__(self, guard: LossGuard):
        self.guard = guard

    def after_interval(self, loop: Loop, record: dict[str, float]) -> None:
        self.guard.after_interval(loop.step, record["train/loss"])


class Validation(Callback):
    """The development evaluation ([Run.validate][subnets.training.runner.Run.validate]) every ``every``
    steps and at the last, on the processes that evaluate."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self, loop: Loop, result: StepResult) -> None:
        if loop.evaluates and (loop.step % self.every == 0 or loop.step == loop.steps):
            with loop.clock("dev_evaluation"):
                loop.validate()


class TrainEnd(Callback):
    """``end``, the method's end-of-training hook (its mask history and figures), at the last step (rank 0)."""

    def __init__(self, end: Callable[[], None]):
        self.end = end

    def after_step(self, loop: Loop, result: StepResult) -> None:
        if loop.is_main and loop.step == loop.steps:
            self.end()


class Conflict(Callback):
    """``measure(step)``, the gradient conflict between the languages, at step 0 and every ``every``
    steps (rank 0; ``analysis.conflict_every``, 0: never)."""

    def __init__(self, every: int, measure: Callable[[int], None]):
        self.every, self.measure = every, measure

    def on_start(self, loop: Loop) -> None:
        if self.every > 0 and loop.step == 0 and loop.is_main:
            with loop.clock("analyses"):
                self.measure(loop.step)

    def after_step(self, loop: Loop, result: StepResult) -> None:
        if self.every > 0 and loop.step % self.every == 0 and loop.is_main:
            with loop.clock("analyses"):
                self.measure(loop.step)


class Checkpoint(Callback):
    """``checkpoints/last.safetensors`` every ``every`` steps while the loss guard finds the run
    healthy (so that it stays the last good state while the loss goes wrong), and at the last step."""

    def __init__(self, every: int, guard: LossGuard):
        self.every, self.guard = every, guard

    def after_step(self, loop: Loop, result: StepResult) -> None:
        if (loop.step % self.every == 0 and self.guard.healthy) or loop.step == loop.steps:
            with loop.clock("checkpoints"):
                loop.save()
