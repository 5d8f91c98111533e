"""A run's training state, typed: what its checkpoints hold and what a resume restores.

[TrainingState][subnets.training.state.TrainingState] holds the step, the best development result,
the model, optimizer, scheduler, language sampler, method (its masks and policy state) and loss
guard of one run, with ``state_dict``/``load_state_dict`` over the checkpoint schema
([Key][subnets.runs.checkpoint_schema.Key]). It writes and reads the run's ``checkpoints/last`` and
``best`` (a sharded run's model and optimizer as shards beside them); [subnets.runs.checkpoint][] keeps
the file format and the generators' states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnets.parallel.distributed import DataParallel
from subnets.parallel.sharding import load_sharded, save_sharded
from subnets.runs.checkpoint import (
    load_checkpoint,
    load_model_state,
    remove_stale_shards,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from subnets.runs.checkpoint_schema import Key
from subnets.runs.folder import RunFolder

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TrainingState:
    """One run's training state (module docstring). ``config`` is the run's resolved config, which
    every checkpoint records; the parts are set once the run is built (``optimizer``, ``scheduler``,
    ``sampler`` and ``guard`` are None where nothing trains, e.g. in an evaluation)."""

    paths: RunFolder
    parallel: DataParallel
    config: dict[str, Any]
    model: nn.Module | None = None
    method: Any = None  # subnets.methods.Method: its state_dict holds the masks and the policy's state
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    sampler: Any = None  # subnets.data.sampling.LanguageSampler
    guard: Any = None  # subnets.training.guards.LossGuard
    device: torch.device | str = "cpu"
    step: int = 0
    best: dict[str, Any] | None = None  # the best development result: {"metric": float, "step": int}
    shards: Path | None = (
        None  # sharded (train.parallel=fsdp): the shards a resume reads once the model is sharded
    )

    def state_dict(self) -> dict[str, Any]:
        """The entries of ``checkpoints/last.safetensors`` (rank 0's), the model and the optimizer
        included unless the run is sharded (its processes write those as shards)."""
        state = {Key.STEP: self.step, Key.CONFIG: self.config}
        if not self.parallel.sharded:
            state.update({Key.MODEL: self.model.state_dict(), Key.OPTIMIZER: self.optimizer.state_dict()})
        state.update({Key.SCHEDULER: self.scheduler.state_dict(), Key.SAMPLER: self.sampler.state_dict(),
                      Key.METHOD: self.method.state_dict(), Key.BEST: self.best,
                      Key.DIVERGENCE: self.guard.state_dict(), Key.RNG: rng_state()})  # fmt: skip
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path, train_steps: int) -> None:
        """Restore everything from a last checkpoint's ``state`` (read from ``path``); a whole
        model's weights unless the checkpoint is sharded (``shards`` names them for later).
        Refuses one without optimizer state if ``train_steps`` are still to train."""
        if Key.SHARDED in state or self.parallel.sharded:
            self.shards = self._checked_shards(path, state)
        else:
            load_model_state(self.model, state[Key.MODEL], path, f"the settings of {self.paths.identity}")
        self.method.load_state_dict(state[Key.METHOD])  # first: masks.train=subnetwork lays out the optimizer
        if Key.OPTIMIZER in state:
            self.optimizer.load_state_dict(state[Key.OPTIMIZER])
        elif Key.SHARDED not in state and state[Key.STEP] < train_steps:
            raise ValueError(f"{path} holds no optimizer state (train.keep_optimizer_state=false dropped it when the "
                             f"run finished at step {state[Key.STEP]}): its training cannot be continued to "
                             f"train.steps={train_steps}; start a new run")  # fmt: skip
        for part, key in (
            (self.scheduler, Key.SCHEDULER),
            (self.sampler, Key.SAMPLER),
            (self.guard, Key.DIVERGENCE),
        ):
            part.load_state_dict(state[key])
        self.step, self.best = state[Key.STEP], state[Key.BEST]
        self.guard.checkpoint_written(self.step)
        set_rng_state(state[Key.RNG_RANKS][self.parallel.rank] if Key.RNG_RANKS in state else state[Key.RNG])

    def save(self) -> Path:
        """Write the full training state to ``checkpoints/last.safetensors`` (rank 0) and tell the
        loss guard. Sharded (call it on every process), the model and the optimizer go to
        ``checkpoints/last-<step>.dcp/``, each process writing its own shards, and the file names
        that folder and holds every process's generators."""
        path, main = self.paths.last_checkpoint, self.parallel.is_main
        extra = {}
        if self.parallel.sharded:
            folder = save_sharded(path.parent / f"last-{self.step}.dcp", self.model, self.optimizer)
            extra = {Key.SHARDED: folder.name, Key.WORLD_SIZE: self.parallel.world_size,
                     Key.RNG_RANKS: self.parallel.gather(rng_state())}  # fmt: skip
        if main:
            save_checkpoint(path, {**self.state_dict(), **extra})
            if self.parallel.sharded:
                remove_stale_shards(path.parent, "last", extra[Key.SHARDED])
            self.guard.checkpoint_written(self.step, None if self.guard.healthy else False)
        return path

    def save_best(self, metric: float) -> Path:
        """Record ``metric`` at this step as the best development result and write the model and
        the method state to ``checkpoints/best.safetensors`` (sharded: every process its shards)."""
        self.best = {"metric": metric, "step": self.step}
        path = self.paths.best_checkpoint
        state = {Key.STEP: self.step, Key.METRIC: metric, Key.CONFIG: self.config}
        if self.parallel.sharded:
            state[Key.SHARDED] = save_sharded(path.parent / f"best-{self.step}.dcp", self.model).name
        else:
            state[Key.MODEL] = self.model.state_dict()
        if self.parallel.is_main:
            save_checkpoint(path, {**state, Key.METHOD: self.method.state_dict()})
            if self.parallel.sharded:
                remove_stale_shards(path.parent, "best", state[Key.SHARDED])
        return path

    def resume(self, train_steps: int) -> bool:
        """Restore from ``checkpoints/last.safetensors`` if there is one (and drop the records a
        killed run logged after it); returns whether it resumed."""
        path, main = self.paths.last_checkpoint, self.parallel.is_main
        if not path.exists():
            if main:
                self.paths.drop_records_after(None)  # a run killed before its first checkpoint starts again
            return False
        self.load_state_dict(load_checkpoint(path, self.device), path, train_steps)
        if main:
            self.paths.drop_records_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def restore_best(self) -> None:
        """Put the best model (``checkpoints/best.safetensors``, its shards for a sharded run) and
        its method state back; the step stays."""
        path = self.paths.best_checkpoint
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing, but the run recorded a best model at step {self.best['step']}"
            )
        best = load_checkpoint(path, self.device)
        if Key.SHARDED in best:
            load_sharded(path.parent / best[Key.SHARDED], self.model)
        else:
            load_model_state(self.model, best[Key.MODEL], path, f"the settings of {self.paths.identity}")
        self.method.load_state_dict(best[Key.METHOD])

    def _checked_shards(self, path: Path, state: dict[str, Any]) -> Path:
        """The folder of shards a sharded checkpoint names, checked against this run's processes."""
        root = self.paths.root
        if Key.SHARDED not in state:
            raise ValueError(f"{path} was written by an unsharded run; it continues with train.parallel=ddp")
        if not self.parallel.sharded:
            raise ValueError(f"{path} is sharded (train.parallel=fsdp): continue the run under torchrun with "
                             "train.parallel=fsdp, or write a whole checkpoint for evaluation and export with "
                             f"`python -m subnets.consolidate run={root}`")  # fmt: skip
        written, now = state[Key.WORLD_SIZE], self.parallel.world_size
        if written != now:
            raise ValueError(f"{path} was written by {written} processes, this run has {now}: train.batch_size is "
                             f"per process, so a step's batch ({written} x train.batch_size sentences) and each "
                             f"process's generators would change; continue it with --nproc_per_node={written} "
                             f"(`python -m subnets.consolidate run={root}` gives a whole checkpoint for "
                             "evaluation and export at any size)")  # fmt: skip
        return path.parent / state[Key.SHARDED]
