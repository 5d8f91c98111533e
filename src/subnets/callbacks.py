"""What the training loop does besides training, as small callbacks: the loss guard, the
development evaluation, the method's end-of-training hook, the gradient-conflict analysis and
the checkpoint. [subnets.runner.Run.train][] calls each in order after every step (and,
for the guard, after every log interval); each says when it acts from its own settings.

A callback of your own has the same three hooks (each optional) and goes into
``Run.callbacks``::

    class StopAtLoss:
        def after_step(self, run, result):
            if result.loss < 0.01:
                raise StopIteration
"""

from __future__ import annotations

import logging

from subnets.guards import LossGuard
from subnets.update import StepResult

log = logging.getLogger(__name__)


class Callback:
    """Hooks of the training loop (each a no-op here)."""

    def on_start(self, run) -> None:
        """Before the first step of this process (step 0, or the step a resume starts from)."""

    def after_step(self, run, result: StepResult) -> None:
        """After step ``run.state.step`` (its update, the policy's after-step hook and logging are done)."""

    def after_interval(self, run, record: dict[str, float]) -> None:
        """After the log interval ending at ``run.state.step`` (``record``: its mean losses)."""


class Guard(Callback):
    """Stops a run whose loss diverges ([LossGuard][subnets.guards.LossGuard]; the step itself
    checks its loss for NaN and infinities, [train_step][subnets.runner.Run.train_step])."""

    def __init__(self, guard: LossGuard):
        self.guard = guard

    def after_interval(self, run, record: dict[str, float]) -> None:
        self.guard.after_interval(run.state.step, record["train/loss"])


class Validation(Callback):
    """The development evaluation every ``every`` steps and at the last (rank 0): the mean of the
    development languages' primary metric; the best model so far goes to
    ``checkpoints/best.safetensors`` (``run.state.best``: its metric and step)."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self, run, result: StepResult) -> None:
        # sharded (train.parallel=fsdp), every process takes part in the forward passes
        evaluates = run.parallel.is_main or run.parallel.sharded
        if evaluates and (run.state.step % self.every == 0 or run.state.step == run.cfg.train.steps):
            with run.clock("dev_evaluation"):
                self.validate(run)

    @staticmethod
    def validate(run) -> float | None:
        """Evaluate the development languages now; returns their mean primary metric."""
        if not run.data.dev:
            return None
        policy = run.method.policy
        policy.prepare_evaluation(run.model, run.data.support)
        metrics, record = run.evaluator.development(run.model, run.data.dev, policy.eval_gates)
        run.log(record)
        metric = record["dev/metric"]
        best = run.task.better(metric, None if run.state.best is None else run.state.best["metric"])
        log.info("development evaluation at step %d: %s; metric %.2f%s", run.state.step,
                 ", ".join(f"{code} {m:.2f}" for code, m in metrics.items()), metric, " (best so far)" if best else "")  # fmt: skip
        if best:
            run.state.save_best(metric)
        return metric


class TrainEnd(Callback):
    """The method's end-of-training hook (its mask history and figures), at the last step (rank 0)."""

    def after_step(self, run, result: StepResult) -> None:
        if run.parallel.is_main and run.state.step == run.cfg.train.steps:
            run.method.policy.on_train_end(run.outputs)


class Conflict(Callback):
    """Gradient conflict between the languages at step 0 and every ``every`` steps (rank 0;
    ``analysis.conflict_every``, 0: never)."""

    def __init__(self, every: int):
        self.every = every

    def measure(self, run) -> None:
        with run.clock("analyses"):
            run.analyses.conflict(
                run.model, run.data.train, run.method.policy, run.state.step, run.method.name
            )

    def on_start(self, run) -> None:
        if self.every > 0 and run.state.step == 0 and run.parallel.is_main:
            self.measure(run)

    def after_step(self, run, result: StepResult) -> None:
        if self.every > 0 and run.state.step % self.every == 0 and run.parallel.is_main:
            self.measure(run)


class Checkpoint(Callback):
    """``checkpoints/last.safetensors`` every ``every`` steps while the loss guard finds the run
    healthy (so that it stays the last good state while the loss goes wrong), and at the last step."""

    def __init__(self, every: int, guard: LossGuard):
        self.every, self.guard = every, guard

    def after_step(self, run, result: StepResult) -> None:
        if (run.state.step % self.every == 0 and self.guard.healthy) or run.state.step == run.cfg.train.steps:
            with run.clock("checkpoints"):
                run.save_checkpoint()
