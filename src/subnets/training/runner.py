"""One training run as a recipe, for any task and method: set up ([assemble][subnets.training.assemble.assemble]),
train (the loop and its [callbacks][subnets.training.callbacks]), evaluate ([Evaluator][subnets.evaluate.Evaluator]),
checkpoint, resume. [run][subnets.training.runner.run] is what ``python -m subnets.train`` calls, with a config and a
run folder ([RunFolder][subnets.runs.folder.RunFolder]), not Hydra: a notebook can call it too."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from subnets.analysis.recorder import Analyses
from subnets.config import setting
from subnets.evaluate import Evaluator
from subnets.evaluate.results import Evaluation, write_results
from subnets.files import read_json
from subnets.methods.base import Outputs, SourceLanguages
from subnets.parallel.distributed import DataParallel
from subnets.parallel.sharding import load_sharded, shard_task_model
from subnets.progress import Clock, bar, duration, run_log
from subnets.runs.checkpoint import drop_optimizer_state, seed_everything
from subnets.runs.folder import RunFolder
from subnets.runs.identity import data_fingerprint, identity_differences, refuse, saved_identity
from subnets.runs.results import format_results
from subnets.training.assemble import (
    CheckedSettings,
    assemble,
    check_inputs,
    check_settings,
    make_optimizer,
    resolve_device,
    training,
)
from subnets.training.callbacks import Checkpoint, Conflict, Guard, Loop, TrainEnd, Validation
from subnets.training.guards import DivergenceGuard, LossGuard
from subnets.training.state import TrainingState
from subnets.training.tracking import Tracker
from subnets.training.update import StepResult

log = logging.getLogger(__name__)


class Run:
    """One run as a recipe: [setup][subnets.training.runner.Run.setup], [train][subnets.training.runner.Run.train],
    [final_evaluation][subnets.training.runner.Run.final_evaluation], [save_checkpoint][subnets.training.runner.Run.save_checkpoint].
    Attributes after ``setup``: ``task``, ``data`` (``RunData``), ``model``, ``tokenizer``, ``batcher``,
    ``method`` (its ``policy`` and ``strategy``), ``optimizer``, ``scheduler``, ``sampler``, ``evaluator``,
    ``callbacks``, ``parallel`` (this process's place in a ``torchrun`` job), ``state`` (the step, the best
    result and all that checkpoints hold: [TrainingState][subnets.training.state.TrainingState])."""

    def __init__(self, cfg: DictConfig, folder: str | os.PathLike):
        self.cfg, self.paths, self.folder = cfg, RunFolder(folder), Path(folder)
        self.clock, self.started = Clock(), time.perf_counter()  # seconds per phase, for results.json
        self.parallel, self.tracker = DataParallel(), Tracker(self.folder, enabled=False)
        self.state = TrainingState(self.paths, self.parallel, {})  # filled in by setup
        train = cfg.train
        divergence = DivergenceGuard(train.divergence_factor, train.divergence_patience)
        self.guard = LossGuard(self.folder, train.max_nonfinite_steps, divergence, self.paths.last_checkpoint)
        self.callbacks = [Guard(self.guard), Validation(train.eval_every), TrainEnd(self.end_training),
                          Conflict(cfg.analysis.conflict_every, self.measure_conflict),
                          Checkpoint(train.checkpoint_every, self.guard)]  # fmt: skip

    def setup(self, record: Mapping[str, str] | None = None, checked: CheckedSettings | None = None) -> None:
        """Check the settings (unless ``checked`` holds what [check_settings][subnets.training.assemble.check_settings]
        returned for them), build everything ([assemble][subnets.training.assemble.assemble]), the optimizer
        and the sampler, and resume from the folder's last checkpoint. A folder that holds another
        run (other settings, data or model, ``subnets.runs.identity``) is refused before anything in
        it is written; ``record`` (e.g. Hydra's ``.hydra/*.yaml``) is written once it is accepted."""
        cfg = self.cfg
        checked = checked or check_settings(cfg)
        saved = saved_identity(self.paths, self.config(), cfg.resume)
        self.folder.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.parallel = DataParallel.from_environment(cfg.train.device, setting(cfg.train.parallel) == "fsdp")
        main = self.parallel.is_main
        self.tracker, started, identity = Tracker(self.folder, enabled=main), time.perf_counter(), {}

        def accept(data, fingerprint) -> None:  # before anything but the data and the tokenizer is written
            files = [d.path for d in data.all() if d.path]
            identity.update(config=self.config(), data=data_fingerprint(files, data.root), model=fingerprint)
            if saved is not None:
                refuse(self.folder, identity_differences(saved, identity))
            if main:
                self.parallel.barrier()

        if not main:
            self.parallel.barrier()  # rank 0 writes the data and the tokenizer first
        if cfg.model.freeze_embeddings and cfg.model.name_or_path == "tiny":
            log.warning("model.freeze_embeddings=true on the tiny model freezes its random initial embeddings (the "
                        "default job loses about 8 development LAS); the setting is meant for pretrained encoders")  # fmt: skip
        device = resolve_device(cfg.train.device, self.parallel)
        self.use(
            assemble(
                cfg,
                self.folder,
                device=device,
                accept=accept,
                task_state=(saved or {}).get("task"),
                checked=checked,
            )
        )
        identity["task"] = self.task.state_dict()
        if cfg.train.compile:  # in place: parameter names, unit-gate hooks and checkpoints are unchanged
            self.model.encoder.transformer.compile()
        parts = training(self.parts, self.parallel)
        self.optimizer, self.scheduler, self.sampler, self.batches = (
            parts.optimizer, parts.scheduler, parts.sampler, parts.batches)  # fmt: skip
        self.state = TrainingState(self.paths, self.parallel, self.config(), self.model, self.method, self.optimizer,
                                   self.scheduler, self.sampler, self.guard, self.device)  # fmt: skip
        policy = self.method.policy
        if main:
            self.paths.record(identity, record)
        self.resumed = self.state.resume(cfg.train.steps)
        self.clock.add("setup", time.perf_counter() - started)
        if main:
            self.tracker.start_wandb(cfg.wandb, cfg.name, self.config())
            with self.clock("mask_search"):
                policy.prepare(self.model, self.source_languages(), self.outputs)
            if cfg.analysis.cka_sentences > 0 and not self.resumed:
                with self.clock("analyses"):
                    self.analyses.cka(self.model, self.data.evaluated, policy.eval_gates, "before", 0)
        if self.parallel.world_size > 1:  # every process starts from rank 0's masks and model
            state = self.parallel.broadcast(self.method.state_dict() if main else None)
            if not main:
                self.method.load_state_dict(state)
                policy.prepare(self.model, self.source_languages(), self.outputs)
            self.parallel.broadcast_parameters(self.model)
        if self.parallel.sharded:  # FSDP2: shard the model, then read a resumed run's shards
            shard_task_model(self.model, self.optimizer, bf16=setting(cfg.train.precision) == "bf16")
            if self.state.shards is not None:
                load_sharded(self.state.shards, self.model, self.optimizer)

    def use(self, parts) -> None:
        """Take what [assemble][subnets.training.assemble.assemble] built (or what a trained run holds)."""
        self.parts, self.task, self.method, self.model = parts, parts.task, parts.method, parts.model
        self.tokenizer, self.batcher, self.collator = parts.tokenizer, parts.batcher, parts.collator
        self.device, self.data = torch.device(parts.batcher.device), getattr(parts, "data", None)
        batch_size = self.cfg.train.eval_batch_size
        self.evaluator = Evaluator(self.task, self.collator, batch_size)
        self.analyses = Analyses(self.cfg.analysis, self.folder, self.batcher, batch_size, self.log)

    def make_optimizer(self, model: torch.nn.Module, extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
        """[make_optimizer][subnets.training.assemble.make_optimizer] with the run's ``train.*`` settings."""
        return make_optimizer(self.cfg.train, model, extra_groups)

    def source_languages(self) -> SourceLanguages:
        """What a mask policy may use before training ([SourceLanguages][subnets.methods.SourceLanguages])."""
        dev = {code: data for (role, code), data in self.data.evaluated.items() if role == "source"}
        metric, batch_size = self.evaluator.metric, self.cfg.train.batch_size
        return SourceLanguages(self.data.train, dev, metric, self.make_optimizer, batch_size, self.tokenizer)

    @property
    def outputs(self) -> Outputs:
        """The run folder and the logger, for the method's own files and figures."""
        return Outputs(self.folder, self.log)

    def config(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)

    def log(self, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Append ``record`` (at the current step) to metrics.jsonl and send it, and any
        matplotlib ``images``, to W&B (rank 0 only)."""
        self.tracker.log(self.state.step, record, images)

    def close(self) -> None:
        """Finish the W&B run (each Hydra job gets its own) and leave the process group."""
        self.tracker.close()
        self.parallel.close()

    def save_checkpoint(self) -> Path:
        """Write the full training state to ``checkpoints/last.safetensors``
        ([TrainingState.save][subnets.training.state.TrainingState.save])."""
        return self.state.save()

    def loop(self) -> Loop:
        """The loop as the [callbacks][subnets.training.callbacks] see it."""
        return Loop(lambda: self.state.step, self.cfg.train.steps, self.parallel.is_main,
                    self.parallel.is_main or self.parallel.sharded,  # sharded, every process takes part in forwards
                    self.validate, self.save_checkpoint, self.log, self.clock)  # fmt: skip

    def validate(self) -> float | None:
        """Evaluate the development languages now: their mean primary metric, logged; the best model so
        far goes to ``checkpoints/best.safetensors`` (``state.best``: its metric and step)."""
        if not self.data.dev:
            return None
        policy = self.method.policy
        policy.prepare_evaluation(self.model, self.data.support)
        metrics, record = self.evaluator.development(self.model, self.data.dev, policy.eval_gates)
        self.log(record)
        metric, best = record["dev/metric"], self.state.best
        better = self.task.better(metric, None if best is None else best["metric"])
        log.info("development evaluation at step %d: %s; metric %.2f%s", self.state.step,
                 ", ".join(f"{code} {m:.2f}" for code, m in metrics.items()), metric, " (best so far)" if better else "")  # fmt: skip
        if better:
            self.state.save_best(metric)
        return metric

    def end_training(self) -> None:
        """The method's end-of-training hook (its mask history and figures)."""
        self.method.policy.on_train_end(self.outputs)

    def measure_conflict(self, step: int) -> None:
        """The gradient conflict between the training languages at ``step`` (``analysis.conflict_every``)."""
        self.analyses.conflict(self.model, self.data.train, self.method.policy, step, self.method.name)

    def train(self) -> None:
        """The training loop, from the current step to ``train.steps``: the method's step, the
        log interval, then the callbacks ([subnets.training.callbacks][])."""
        train, main = self.cfg.train, self.parallel.is_main
        if self.state.step >= train.steps:
            return
        progress = bar(train.steps, "train", "step", initial=self.state.step, enabled=main)
        totals: dict[str, float] = {}
        start, first_step, loop = time.perf_counter(), self.state.step, self.loop()
        for callback in self.callbacks:
            callback.on_start(loop)
        while self.state.step < train.steps:
            with self.clock("training_steps"):
                result, extra = self.train_step()
            progress.update(1)
            values = {"loss": result.loss, **result.losses, "grad_norm": result.grad_norm, "steps": 1,
                      "skipped_steps": float(result.skipped), "words": result.words, **extra}  # fmt: skip
            totals = {key: totals.get(key, 0.0) + value for key, value in values.items()}
            if self.state.step % train.log_every == 0 or self.state.step == train.steps:
                n, words = totals.pop("steps"), totals.pop("words")
                record = {f"train/{k}": v / n for k, v in totals.items()}
                record["train/words_per_second"] = words / (time.perf_counter() - start)
                record.update({f"lr/{g.get('name', 'group')}": g["lr"] for g in self.optimizer.param_groups})
                self.log(record)
                loss, speed = record["train/loss"], record["train/words_per_second"]
                progress.set_postfix(loss=f"{loss:.3f}", words_per_s=f"{speed:.0f}")
                totals, start = {}, time.perf_counter()
                if main:
                    elapsed = time.perf_counter() - self.started
                    eta = duration(elapsed / (self.state.step - first_step) * (train.steps - self.state.step))
                    lr = self.optimizer.param_groups[0]["lr"]
                    log.info("step %d/%d  loss %.4f  lr %.2e  %.0f words/s  elapsed %s  ETA %s", self.state.step,
                             train.steps, loss, lr, speed, duration(elapsed), eta)  # fmt: skip
                for callback in self.callbacks:
                    callback.after_interval(loop, record)
            for callback in self.callbacks:
                callback.after_step(loop, result)
        progress.close()

    def train_step(self) -> tuple[StepResult, dict[str, float]]:
        """One step of the loop: the method's step, the check of its loss for NaN and infinities
        and the policy's after-step hook (no logging, evaluation or checkpoint); returns the
        step's result and the values the policy logs."""
        train = self.cfg.train
        result = self.method.strategy.step(
            self.model, self.batches, self.optimizer, self.method.policy, batch_size=train.batch_size,
            clip_norm=train.clip_norm, scheduler=self.scheduler, parallel=self.parallel,
        )  # fmt: skip
        self.state.step += 1
        self.guard.after_step(self.state.step, result.loss, result.skipped, result.language, result.grad_norm)
        return result, self.method.policy.after_step(self.state.step, result)

    def final_evaluation(self) -> dict[str, Any]:
        """Evaluate the best model on every language and split; write predictions and results.json."""
        if self.state.best is not None:
            self.state.restore_best()
        policy = self.method.policy
        with self.clock("final_evaluation"):
            policy.prepare_evaluation(self.model, self.data.support)
        if self.cfg.analysis.cka_sentences > 0:
            with self.clock("analyses"):
                self.analyses.cka(
                    self.model, self.data.evaluated, policy.eval_gates, "after", self.state.step
                )
        status = self.guard.status()
        if status["status"] == "diverged":
            divergence = status["divergence"]
            log.warning("the run ended with its training loss diverging (since step %d, above %s): its results are "
                        "those of a diverged run (results.json status: diverged)", divergence["since_step"],
                        divergence["reference"])  # fmt: skip
        return write_results(self.evaluation(), status)

    def evaluation(self) -> Evaluation:
        """What the final evaluation scores: the model as it is now, with this run's method, data and folder."""
        return Evaluation(self.cfg, self.model, self.method, self.task, self.data, self.batcher, self.tokenizer,
                          self.paths, self.state.step, self.state.best, self.parallel.is_main, self.clock,
                          self.started, self.log)  # fmt: skip


def run(
    cfg: DictConfig, folder: str | os.PathLike, record: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Set up, train, evaluate; returns the results (also in ``folder/results.json``). The folder
    is locked for the whole run ([RunFolder.lock][subnets.runs.folder.RunFolder.lock]); one that holds a
    checkpoint is resumed (``resume=true``), a finished one is not run again unless ``overwrite=true``, which
    first checks everything ([check_inputs][subnets.training.assemble.check_inputs]), then deletes its outputs.
    ``record``: files written once the folder is accepted ([Run.setup][subnets.training.runner.Run.setup]). Under
    ``torchrun`` rank 0 holds the lock and returns the results, the others an empty dict. Errors also go to
    the folder's ``train.log``."""
    paths, main = RunFolder(folder), int(os.environ.get("RANK", "0")) == 0
    with run_log(folder):  # into the folder's train.log once it exists (Hydra makes it first)
        try:
            checked = check_settings(cfg)  # before the folder is made or locked
            with paths.lock() if main else nullcontext():
                if cfg.overwrite and main:
                    check_inputs(cfg, checked)
                    paths.clear()
                results, trained = _train_and_evaluate(Run(cfg, paths.root), record, checked)
        except Exception as error:
            log.error("%s: %s", type(error).__name__, error)
            raise
    if trained and results:
        print(format_results(results))
    return results


def _train_and_evaluate(
    training: Run, record: Mapping[str, str] | None, checked: CheckedSettings
) -> tuple[dict[str, Any], bool]:
    """The results (rank 0; the other ranks an empty dict) and whether this call trained (False:
    the folder held a finished run)."""
    cfg, paths = training.cfg, training.paths
    try:
        training.setup(record, checked)
        main = training.parallel.is_main
        finished = training.resumed and training.state.step >= cfg.train.steps and paths.results.exists()
        if finished:
            message = f"{paths.root} already finished; its results are in {paths.results} (overwrite=true reruns it)"
            log.info(message)
            print(message)
            results = read_json(paths.results, "the run's results") if main else {}
        else:
            training.train()
            # sharded, every process takes part in each forward pass: all evaluate, rank 0 writes
            results = training.final_evaluation() if main or training.parallel.sharded else {}
            results = results if main else {}
            if main:
                log.info("finished in %s; results in %s", duration(time.perf_counter() - training.started),
                         paths.results)  # fmt: skip
        if main and not cfg.train.keep_optimizer_state:
            drop_optimizer_state(paths.last_checkpoint)
        return results, not finished
    finally:
        training.close()
