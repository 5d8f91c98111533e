"""Guards on a run's training loss: NaN or infinite steps, and losses that diverge while finite.

[DivergenceGuard][subnets.training.guards.DivergenceGuard] holds the rule,
[LossGuard][subnets.training.guards.LossGuard] watches a run with it: it is told every step's result and every log
interval's mean loss, says whether the run is healthy enough for a checkpoint to be called good, and stops the
run with an error that names the steps and the last checkpoint that is known to be good (or says that none
is).

The divergence rule. The *reference* is the lower of the first step's loss (the untrained
model's, before any update) and the lowest log-interval mean so far. A log interval whose mean
loss exceeds ``factor`` times the reference is flagged; so is, for the checkpoint rule, a
single step whose loss exceeds ``factor`` times the first step's loss. A run that climbs from
its first interval on is therefore caught (its first step's loss is the reference), as is one
that climbs after having fallen. ``patience`` flagged intervals in a row stop the run; a run
that ends inside a flagged streak is *diverged* (``results.json`` ``status: diverged``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass
class DivergenceGuard:
    """The divergence rule (module docstring). ``factor <= 0`` switches it off."""

    factor: float = 10.0
    patience: int = 3
    initial: float | None = None  # the first finite step loss: the untrained model's
    best: float | None = None  # the lowest interval mean so far
    best_step: int = 0
    in_a_row: int = 0  # flagged intervals in a row, ending at the latest
    streak_start: int = 0  # the step of the first interval of the current streak
    flagged: int = 0  # flagged intervals in the whole run
    spike: bool = False  # a step since the last interval check was above factor x the first step's loss

    @property
    def on(self) -> bool:
        return self.factor > 0

    @property
    def reference(self) -> float | None:
        """The lower of the first step's loss and the best interval mean (None before any)."""
        known = [v for v in (self.initial, self.best) if v is not None]
        return min(known) if known else None

    def observe(self, loss: float) -> bool:
        """Record one step's (finite) loss; returns whether it is a spike (module docstring)."""
        if not self.on or not math.isfinite(loss):
            return False
        if self.initial is None:
            self.initial = loss
            return False
        if loss > self.factor * self.initial:
            self.spike = True
            return True
        return False

    def check(self, step: int, loss: float) -> bool:
        """Record the mean loss of the interval ending at ``step``; returns whether it is flagged."""
        self.spike = False
        if not self.on or loss != loss:  # off, or a NaN mean (the NaN guard's business)
            return False
        reference = self.reference
        if reference is not None and loss > self.factor * reference:
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
        return self.on and self.in_a_row >= self.patience

    @property
    def diverging(self) -> bool:
        """Whether the latest interval was flagged, or a step since then spiked."""
        return self.on and (self.in_a_row > 0 or self.spike)

    def describe(self) -> str:
        """What the reference is, in words, for log lines and errors."""
        parts = []
        if self.initial is not None:
            parts.append(f"the first step's loss {self.initial:.4g}")
        if self.best is not None:
            parts.append(f"the best interval mean {self.best:.4g} (step {self.best_step})")
        if not parts:
            return "no reference yet"
        return f"{self.factor:g} x " + (f"the lower of {' and '.join(parts)}" if len(parts) > 1 else parts[0])

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():  # a checkpoint of an earlier version lacks the newer keys
            setattr(self, key, value)


class LossGuard:
    """Watches a run's losses (module docstring) and knows whether its last checkpoint is good.

    A checkpoint holds the weights after its step; it is *good* once the next step's loss is
    finite and no spike, while no interval is flagged. The runner calls
    [after_step][subnets.training.guards.LossGuard.after_step] after every step,
    [after_interval][subnets.training.guards.LossGuard.after_interval] after every log interval and
    [checkpoint_written][subnets.training.guards.LossGuard.checkpoint_written] after every checkpoint.

    Args:
        where: the run (its folder), named in the errors.
        max_nonfinite: steps in a row with a NaN or infinite loss or gradient that stop the run.
        checkpoint: the path of the checkpoint the run keeps replacing, named in the errors.
    """

    def __init__(self, where: object, max_nonfinite: int, divergence: DivergenceGuard, checkpoint: object):
        self.where, self.max_nonfinite, self.divergence, self.checkpoint = (
            where,
            max_nonfinite,
            divergence,
            checkpoint,
        )
        self.nonfinite_in_a_row = 0
        self.checkpoint_step: int | None = None  # the step the checkpoint holds
        self.checkpoint_good: bool | None = None  # None: not judged yet (the next step tells)

    @property
    def healthy(self) -> bool:
        """Whether the state after the latest step may be checkpointed as a good one (as far as
        its own loss tells: the next step's loss confirms it)."""
        return self.nonfinite_in_a_row == 0 and not self.divergence.diverging

    def checkpoint_written(self, step: int, good: bool | None = None) -> None:
        """Record the checkpoint written after ``step`` (``good``: known to be, or None: to be
        judged by the next step; a resumed checkpoint was judged when it was written)."""
        self.checkpoint_step, self.checkpoint_good = step, good

    def last_good(self) -> str:
        """The last good checkpoint, or why there is none, as a sentence part."""
        if self.checkpoint_step is None:
            return "no checkpoint was written"
        if self.checkpoint_good:
            return f"the last good checkpoint is {self.checkpoint} (step {self.checkpoint_step})"
        if self.checkpoint_good is None:
            return f"the last checkpoint is {self.checkpoint} (step {self.checkpoint_step}), not yet confirmed good"
        return (f"no good checkpoint is kept: {self.checkpoint} (step {self.checkpoint_step}) holds weights whose next "
                "loss was already wrong")  # fmt: skip

    def after_step(
        self, step: int, loss: float, skipped: bool, language: str = "", grad_norm: float = 0.0
    ) -> None:
        """Judge step ``step``; raises FloatingPointError after ``max_nonfinite`` skipped steps in a row."""
        spike = False if skipped else self.divergence.observe(loss)
        if self.checkpoint_good is None and self.checkpoint_step == step - 1:
            self.checkpoint_good = not skipped and not spike and self.divergence.in_a_row == 0
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        log.warning(
            "step %d (%s): loss %s, gradient norm %s; the step was skipped", step, language, loss, grad_norm
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            first = step - self.nonfinite_in_a_row + 1
            raise FloatingPointError(
                f"{self.where}: {self.nonfinite_in_a_row} steps in a row (steps {first}-{step}, "
                f"train.max_nonfinite_steps={self.max_nonfinite}) had a NaN or infinite loss or gradient; "
                f"{self.last_good()}. Lower the learning rates (train.lr_encoder, train.lr_head) or check the data."
            )

    def after_interval(self, step: int, loss: float) -> None:
        """Judge the log interval ending at ``step`` (mean loss ``loss``); raises FloatingPointError
        after ``patience`` flagged intervals in a row."""
        guard = self.divergence
        reference = guard.describe()
        if not guard.check(step, loss):
            return
        log.warning("step %d: training loss %.4g is above %s: diverging", step, loss, reference)
        if self.checkpoint_step is not None and self.checkpoint_good is None:
            self.checkpoint_good = False  # written inside the interval that just failed
        if guard.exhausted:
            raise FloatingPointError(
                f"{self.where}: the training loss diverged: {guard.in_a_row} log intervals in a row (steps "
                f"{guard.streak_start}-{step}) above {reference}; the last was {loss:.4g} "
                f"(train.divergence_factor={guard.factor:g}, train.divergence_patience={guard.patience}); "
                f"{self.last_good()}. Lower the learning rates (train.lr_encoder, train.lr_head, meta.inner_lr_*) "
                "or check the data."
            )

    def status(self) -> dict:
        """What results.json says of the run's health: ``status`` (``ok`` or ``diverged``: the run
        ended inside a flagged streak) and the count of flagged intervals."""
        guard = self.divergence
        status = {"status": "diverged" if guard.on and guard.in_a_row > 0 else "ok",
                  "diverging_log_intervals": guard.flagged}  # fmt: skip
        if status["status"] == "diverged":
            status["divergence"] = {"since_step": guard.streak_start, "reference": guard.describe()}
        return status

    def state_dict(self) -> dict:
        return self.divergence.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.divergence.load_state_dict(state)
