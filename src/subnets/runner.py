"""One training run as a recipe: set up (:func:`~subnets.assemble.assemble`), train, evaluate
(:class:`~subnets.evaluate.Evaluator`), checkpoint, resume, for any task and method.

:func:`run` is what ``python -m subnets.train`` calls; it needs a config (see
:mod:`subnets.config`) and a run folder (:class:`~subnets.runfolder.RunFolder`: every path it
writes, README "What a run writes"), not Hydra, so a notebook can call it too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from subnets.analysis.recorder import Analyses
from subnets.assemble import assemble, check_inputs, check_settings, resolve_device
from subnets.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from subnets.config import setting
from subnets.data.languages import data_cache, data_root, load_run_data
from subnets.data.sampling import LanguageSampler
from subnets.distributed import DataParallel
from subnets.evaluate import Evaluator
from subnets.fewshot import few_shot
from subnets.files import atomic_write_json, read_json
from subnets.guards import DivergenceGuard, LossGuard
from subnets.identity import data_fingerprint, identity_differences, refuse, saved_identity
from subnets.methods.base import Outputs, SourceLanguages, TrainingBatches
from subnets.progress import Clock, bar, duration, run_log
from subnets.results import format_results
from subnets.runfolder import RunFolder
from subnets.tracking import Tracker
from subnets.update import StepResult, linear_schedule, parameter_groups

log = logging.getLogger(__name__)


class Run:
    """One run in the shape of a recipe: :meth:`setup`, :meth:`train`, :meth:`final_evaluation`,
    :meth:`save_checkpoint`. Attributes after :meth:`setup`: ``task``, ``data``
    (:class:`~subnets.data.languages.RunData`), ``model``, ``tokenizer``, ``batcher``,
    ``method`` (its ``policy`` and ``strategy``), ``optimizer``, ``scheduler``, ``sampler``,
    ``evaluator``, ``parallel`` (this process's place in a ``torchrun`` job)."""

    def __init__(self, cfg: DictConfig, folder: str | os.PathLike):
        self.cfg, self.paths, self.folder = cfg, RunFolder(folder), Path(folder)
        self.step, self.best = 0, None  # best: {"metric": float, "step": int}
        self.clock, self.started = Clock(), time.perf_counter()  # seconds per phase, for results.json
        self.parallel, self.tracker = DataParallel(), Tracker(self.folder, enabled=False)
        divergence = DivergenceGuard(cfg.train.divergence_factor, cfg.train.divergence_patience)
        self.guard = LossGuard(
            self.folder, cfg.train.max_nonfinite_steps, divergence, self.paths.last_checkpoint
        )

    # ------------------------------------------------------------------ setup
    def setup(self, record: Mapping[str, str] | None = None) -> None:
        """Check the settings, build everything (:func:`~subnets.assemble.assemble`), the optimizer
        and the sampler, and resume from the folder's last checkpoint. A folder that holds another
        run (other settings, data or model, :mod:`subnets.identity`) is refused before anything
        in it is written; ``record`` (e.g. Hydra's ``.hydra/*.yaml``) is written once it is accepted."""
        cfg = self.cfg
        check_settings(cfg)
        saved = saved_identity(self.paths, self.config(), cfg.resume)
        self.folder.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.parallel = DataParallel.from_environment(cfg.train.device)
        main = self.parallel.is_main
        self.tracker = Tracker(self.folder, enabled=main)
        started = time.perf_counter()
        identity = {}

        def accept(data, fingerprint) -> None:  # before anything but the data and the tokenizer is written
            identity.update(config=self.config(), data=data_fingerprint([d.path for d in data.all() if d.path], data.root),
                            model=fingerprint)  # fmt: skip
            if saved is not None:
                refuse(self.folder, identity_differences(saved, identity))
            if main:
                self.parallel.barrier()

        if not main:
            self.parallel.barrier()  # rank 0 writes the data and the tokenizer first
        if cfg.model.freeze_embeddings and cfg.model.name_or_path == "tiny":
            log.warning("model.freeze_embeddings=true on the tiny model freezes its random initial embeddings (the "
                        "default job loses about 8 development LAS); the setting is meant for pretrained encoders")  # fmt: skip
        self.use(assemble(cfg, self.folder, device=resolve_device(cfg.train.device, self.parallel), accept=accept,
                          task_state=None if saved is None else saved.get("task")))  # fmt: skip
        identity["task"] = self.task.state_dict()
        if cfg.train.compile:  # in place: parameter names, unit-gate hooks and checkpoints are unchanged
            self.model.encoder.transformer.compile()
        policy = self.method.policy
        policy.bind(self.model, self.batcher, list(self.data.train))
        self.method.strategy.bind(self.model)
        extra = [*self.method.strategy.parameter_groups(), *policy.parameter_groups()]
        self.optimizer = policy.wrap_optimizer(self.make_optimizer(self.model, extra), self.model)
        decay = setting(cfg.train.schedule) == "linear"
        self.scheduler = linear_schedule(self.optimizer, cfg.train.warmup_steps, cfg.train.steps, decay)
        sizes = {code: len(data) for code, data in self.data.train.items()}
        small = [f"{code} ({n})" for code, n in sizes.items() if n < self.parallel.world_size]
        if small:
            raise ValueError(f"{self.parallel.world_size} processes need at least as many training examples "
                             f"per language; too few in {', '.join(small)}")  # fmt: skip
        self.sampler = LanguageSampler(sizes, cfg.train.batch_size, cfg.train.sampling_alpha, cfg.seed)
        self.batches = TrainingBatches(self.sampler, self.data.train, self.batcher, self.parallel)
        if main:
            self.paths.record(identity, record)
        self.resumed = self._resume()
        self.clock.add("setup", time.perf_counter() - started)
        if main:
            self.tracker.start_wandb(cfg.wandb, cfg.name, self.config())
            with self.clock("mask_search"):
                policy.prepare(self.model, self.source_languages(), self.outputs)
            if cfg.analysis.cka_sentences > 0 and not self.resumed:
                with self.clock("analyses"):
                    self.analyses.cka(self.model, self.data.evaluated, policy.eval_gates, "before", self.step)
        if self.parallel.world_size > 1:  # every process starts from rank 0's masks and model
            state = self.parallel.broadcast(self.method.state_dict() if main else None)
            if not main:
                self.method.load_state_dict(state)
                policy.prepare(self.model, self.source_languages(), self.outputs)
            self.parallel.broadcast_parameters(self.model)

    def use(self, parts) -> None:
        """Take what :func:`~subnets.assemble.assemble` built (or a trained run holds)."""
        self.task, self.method, self.model, self.tokenizer = (
            parts.task,
            parts.method,
            parts.model,
            parts.tokenizer,
        )
        self.batcher, self.collator, self.device = (
            parts.batcher,
            parts.collator,
            torch.device(parts.batcher.device),
        )
        self.data = getattr(parts, "data", None)
        self.evaluator = Evaluator(self.task, self.collator, self.cfg.train.eval_batch_size)
        self.analyses = Analyses(
            self.cfg.analysis, self.folder, self.batcher, self.cfg.train.eval_batch_size, self.log
        )

    def setup_evaluation(self, trained) -> None:
        """Set up to evaluate a trained run (:class:`~subnets.trained.TrainedRun`) on this run's
        languages, with no training; only this run's folder is written (its synthetic data)."""
        cfg = self.cfg
        self.use(trained)
        self.step, self.best = trained.step, trained.best
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.clock("setup"):
            cache = data_cache(cfg.languages)
            self.data = load_run_data(cfg.languages, cfg.fewshot, data_root(cfg.languages, self.folder), self.task,
                                      seed=cfg.seed, needs_support=self.method.policy.needs_support,
                                      read_train=False, cache=cache)  # fmt: skip
            for data in self.data.all():
                self.task.check(data.examples, f"{data.code} {data.split} ({data.path})")
            self.data.tokenize(self.tokenizer, cache)
        with self.clock("final_evaluation"):
            self.method.policy.prepare_evaluation(self.model, self.data.support)

    def make_optimizer(self, model: torch.nn.Module, extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
        """``train.optimizer`` over ``model``'s parameter groups (encoder and head rates, no decay
        on biases and LayerNorm) and ``extra_groups``."""
        train = self.cfg.train
        groups = parameter_groups(model, train.lr_encoder, train.lr_head, train.weight_decay)
        return instantiate(train.optimizer)([*groups, *extra_groups])

    def source_languages(self) -> SourceLanguages:
        """What a mask policy may use before training (:class:`~subnets.methods.SourceLanguages`)."""
        dev = {code: data for (role, code), data in self.data.evaluated.items() if role == "source"}
        return SourceLanguages(
            self.data.train, dev, self.evaluator.metric, self.make_optimizer, self.cfg.train.batch_size
        )

    @property
    def outputs(self) -> Outputs:
        """The run folder and the logger, for the method's own files and figures."""
        return Outputs(self.folder, self.log)

    def config(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write the full training state to ``checkpoints/last.safetensors`` (rank 0 only)."""
        path = self.paths.last_checkpoint
        if not self.parallel.is_main:
            return path
        state = {"step": self.step, "config": self.config(), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "method": self.method.state_dict(), "best": self.best,
                 "divergence": self.guard.state_dict(), "rng": rng_state()}  # fmt: skip
        save_checkpoint(path, state)
        self.guard.checkpoint_written(self.step, None if self.guard.healthy else False)
        return path

    def drop_optimizer_state(self) -> None:
        """Rewrite the last checkpoint of a finished run without the optimizer state
        (``train.keep_optimizer_state=false``); a no-op where it is already gone."""
        path = self.paths.last_checkpoint
        if not self.parallel.is_main or not path.exists():
            return
        state = load_checkpoint(path)
        if "optimizer" in state:
            before = path.stat().st_size
            del state["optimizer"]
            save_checkpoint(path, state)
            log.info("dropped the optimizer state from %s: %.1f MB -> %.1f MB", path, before / 1e6,
                     path.stat().st_size / 1e6)  # fmt: skip

    def _resume(self) -> bool:
        path, main = self.paths.last_checkpoint, self.parallel.is_main
        if not path.exists():
            if main:
                self.paths.drop_records_after(None)  # a run killed before its first checkpoint starts again
            return False
        state = load_checkpoint(path, self.device)
        load_model_state(self.model, state["model"], path, f"the settings of {self.paths.identity}")
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        elif state["step"] < self.cfg.train.steps:
            raise ValueError(f"{path} holds no optimizer state (train.keep_optimizer_state=false dropped it when the "
                             f"run finished at step {state['step']}): its training cannot be continued to "
                             f"train.steps={self.cfg.train.steps}; start a new run")  # fmt: skip
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.method.load_state_dict(state["method"])
        self.step, self.best = state["step"], state["best"]
        self.guard.load_state_dict(state["divergence"])
        self.guard.checkpoint_written(self.step)
        set_rng_state(state["rng"])
        if main:
            self.paths.drop_records_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ logging
    def log(self, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Append ``record`` (at the current step) to metrics.jsonl and send it, and any
        matplotlib ``images``, to W&B (rank 0 only)."""
        self.tracker.log(self.step, record, images)

    def close(self) -> None:
        """Finish the W&B run (each Hydra job gets its own) and leave the process group."""
        self.tracker.close()
        self.parallel.close()

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """The training loop, from the current step to ``train.steps``."""
        train, policy, main, clock = self.cfg.train, self.method.policy, self.parallel.is_main, self.clock
        if self.step >= train.steps:
            return
        progress = bar(train.steps, "train", "step", initial=self.step, enabled=main)
        totals: dict[str, float] = {}
        start = loop_start = time.perf_counter()
        first_step, conflict_every = self.step, self.cfg.analysis.conflict_every
        if self.step == 0 and conflict_every > 0 and main:
            with clock("analyses"):
                self.analyses.conflict(self.model, self.data.train, policy, self.step, self.method.name)
        while self.step < train.steps:
            with clock("training_steps"):
                result, extra = self.train_step()
            progress.update(1)
            for key, value in {"loss": result.loss, **result.losses, "grad_norm": result.grad_norm,
                               "skipped_steps": float(result.skipped), "steps": 1, "words": result.words,
                               **extra}.items():  # fmt: skip
                totals[key] = totals.get(key, 0.0) + value
            if self.step % train.log_every == 0 or self.step == train.steps:
                seconds = time.perf_counter() - start
                n, words = totals.pop("steps"), totals.pop("words")
                record = {f"train/{k}": v / n for k, v in totals.items()}
                record["train/words_per_second"] = words / seconds
                record.update({f"lr/{g.get('name', 'group')}": g["lr"] for g in self.optimizer.param_groups})
                self.log(record)
                progress.set_postfix(
                    loss=f"{record['train/loss']:.3f}", words_per_s=f"{record['train/words_per_second']:.0f}"
                )
                totals, start = {}, time.perf_counter()
                if main:
                    eta = (
                        (time.perf_counter() - loop_start)
                        / (self.step - first_step)
                        * (train.steps - self.step)
                    )
                    log.info("step %d/%d  loss %.4f  lr %.2e  %.0f words/s  elapsed %s  ETA %s", self.step, train.steps,
                             record["train/loss"], self.optimizer.param_groups[0]["lr"],
                             record["train/words_per_second"], duration(time.perf_counter() - self.started),
                             duration(eta))  # fmt: skip
                self.guard.after_interval(self.step, record["train/loss"])
            if main and (self.step % train.eval_every == 0 or self.step == train.steps):
                with clock("dev_evaluation"):
                    self.validate()
            if main and self.step == train.steps:
                policy.on_train_end(self.outputs)
            if main and conflict_every > 0 and self.step % conflict_every == 0:
                with clock("analyses"):
                    self.analyses.conflict(self.model, self.data.train, policy, self.step, self.method.name)
            # While the loss goes wrong, last.safetensors stays the last good state (but at the end).
            if (self.step % train.checkpoint_every == 0 and self.guard.healthy) or self.step == train.steps:
                with clock("checkpoints"):
                    self.save_checkpoint()
        progress.close()

    def train_step(self) -> tuple[StepResult, dict[str, float]]:
        """One step of the loop: the method's step, the loss guard and the policy's after-step
        hook (no logging, evaluation or checkpoint); returns the step's result and the values the
        policy logs."""
        train = self.cfg.train
        result = self.method.strategy.step(
            self.model, self.batches, self.optimizer, self.method.policy, batch_size=train.batch_size,
            clip_norm=train.clip_norm, scheduler=self.scheduler, parallel=self.parallel,
        )  # fmt: skip
        self.step += 1
        self.guard.after_step(self.step, result.loss, result.skipped, result.language, result.grad_norm)
        return result, self.method.policy.after_step(self.step, result)

    # ------------------------------------------------------------------ evaluation
    def validate(self) -> float | None:
        """Evaluate the development languages; keep the best model in ``checkpoints/best.safetensors``."""
        if not self.data.dev:
            return None
        policy = self.method.policy
        policy.prepare_evaluation(self.model, self.data.support)
        metrics, record = self.evaluator.development(self.model, self.data.dev, policy.eval_gates)
        self.log(record)
        metric = record["dev/metric"]
        best = self.task.better(metric, None if self.best is None else self.best["metric"])
        log.info("development evaluation at step %d: %s; metric %.2f%s", self.step,
                 ", ".join(f"{code} {m:.2f}" for code, m in metrics.items()), metric, " (best so far)" if best else "")  # fmt: skip
        if best:
            self.best = {"metric": metric, "step": self.step}
            save_checkpoint(self.paths.best_checkpoint, {"step": self.step, "metric": metric, "config": self.config(),
                                                         "model": self.model.state_dict(),
                                                         "method": self.method.state_dict()})  # fmt: skip
        return metric

    def final_evaluation(self) -> dict[str, Any]:
        """Evaluate the best model on every language and split; write predictions and results.json."""
        if self.best is not None:
            path = self.paths.best_checkpoint
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is missing, but the run recorded a best model at step {self.best['step']}"
                )
            best = load_checkpoint(path, self.device)
            load_model_state(self.model, best["model"], path, f"the settings of {self.paths.identity}")
            self.method.load_state_dict(best["method"])
        with self.clock("final_evaluation"):
            self.method.policy.prepare_evaluation(self.model, self.data.support)
        if self.cfg.analysis.cka_sentences > 0:
            with self.clock("analyses"):
                self.analyses.cka(
                    self.model, self.data.evaluated, self.method.policy.eval_gates, "after", self.step
                )
        status = self.guard.status()
        if status["status"] == "diverged":
            log.warning("the run ended with its training loss diverging (since step %d, above %s): its results are "
                        "those of a diverged run (results.json status: diverged)", status["divergence"]["since_step"],
                        status["divergence"]["reference"])  # fmt: skip
        return self.write_results(status)

    def write_results(self, about: Mapping[str, Any]) -> dict[str, Any]:
        """Score the current model on every evaluated language (predictions into
        ``predictions/``), run the few-shot protocol, and write ``results.json``, with the
        entries of ``about`` after the run's step and best model. The method's test-time
        policy must be prepared (``prepare_evaluation``)."""
        cfg, policy, suffix = self.cfg, self.method.policy, self.task.prediction_suffix
        with self.clock("final_evaluation"):
            scores = self.evaluator.languages(self.model, self.data.evaluated, policy.eval_gates,
                                              lambda code, split: self.paths.predictions(f"{code}-{split}{suffix}"))  # fmt: skip
        results = {"method": self.method.name, "task": self.task.describe(), "seed": cfg.seed,
                   "data": setting(cfg.languages.source), "steps": self.step,
                   "best_step": self.best["step"] if self.best else None,
                   "dev_metric": self.best["metric"] if self.best else None, **about,
                   "skipped_sentences": self.data.skipped,
                   "support": {code: {"split": d.split, "sentences": len(d)} for code, d in self.data.support.items()},
                   **policy.summary(), **scores, **self.evaluator.means(scores)}  # fmt: skip
        if self.data.target_test and cfg.fewshot.repetitions > 0:
            with self.clock("few_shot"):
                results["fewshot"] = self.few_shot()
        results["seconds"] = {**self.clock.rounded(), "total": round(time.perf_counter() - self.started, 2)}
        atomic_write_json(self.paths.results, results)
        self.log({f"final/{role}/{code}/{k}": v for role in scores for code, s in scores[role].items()
                  for k, v in s.items() if k not in ("split", self.task.count)})  # fmt: skip
        return results

    def few_shot(self) -> dict[str, Any]:
        """The few-shot protocol (:func:`subnets.fewshot.few_shot`) on the target languages with
        the current model and the method's test-time policy; predictions of repetition 0 go to
        ``predictions/fewshot/``."""
        cfg = self.cfg
        return few_shot(self.model, self.method.policy, self.data.target_test, self.data.support_pools, self.batcher,
                        self.tokenizer, cfg.fewshot, self.evaluator, seed=cfg.seed, clip_norm=cfg.train.clip_norm,
                        predictions=self.paths.predictions("fewshot"))  # fmt: skip


def run(
    cfg: DictConfig, folder: str | os.PathLike, record: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Set up, train, evaluate; returns the results (also in ``folder/results.json``).

    The folder is locked for the whole run (:meth:`RunFolder.lock`: a second command on it is
    refused, naming the holder). A run folder that already holds a checkpoint is resumed
    (``resume=true``); one whose training finished and whose results exist is not run again,
    unless ``overwrite=true``, which first checks the new settings, data and model
    (:func:`~subnets.assemble.check_inputs`) and then deletes the folder's earlier outputs.
    ``record``: files written into the folder once it is accepted (:meth:`Run.setup`). Under
    ``torchrun`` every process trains; rank 0 holds the lock, evaluates and returns the results,
    the others return an empty dict. An error is also written to the folder's ``train.log``.
    """
    paths = RunFolder(folder)
    main = int(os.environ.get("RANK", "0")) == 0
    with run_log(folder):  # into the folder's train.log once it exists (Hydra makes it first)
        try:
            check_settings(cfg)  # before the folder is made or locked
            with paths.lock() if main else nullcontext():
                return _run_locked(cfg, paths, record, main)
        except Exception as error:
            log.error("%s: %s", type(error).__name__, error)
            raise


def _run_locked(
    cfg: DictConfig, paths: RunFolder, record: Mapping[str, str] | None, main: bool
) -> dict[str, Any]:
    if cfg.overwrite and main:
        check_inputs(cfg)
        paths.clear()
    training = Run(cfg, paths.root)
    try:
        training.setup(record)
        if training.resumed and training.step >= cfg.train.steps and paths.results.exists():
            message = f"{paths.root} already finished; its results are in {paths.results} (overwrite=true reruns it)"
            log.info(message)
            print(message)
            if not cfg.train.keep_optimizer_state:
                training.drop_optimizer_state()
            return read_json(paths.results, "the run's results") if training.parallel.is_main else {}
        training.train()
        if not training.parallel.is_main:
            return {}
        results = training.final_evaluation()
        if not cfg.train.keep_optimizer_state:
            training.drop_optimizer_state()
        log.info(
            "finished in %s; results in %s", duration(time.perf_counter() - training.started), paths.results
        )
    finally:
        training.close()
    print(format_results(results))
    return results
