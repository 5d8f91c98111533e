"""One training run as a recipe: set up data, model and method, train, evaluate, checkpoint, resume.

:func:`run` is what ``python -m subnets.train`` calls; it needs a config (see
:mod:`subnets.config`) and a run folder, not Hydra, so a notebook can call it too. Everything a
run produces lands in the run folder::

    checkpoints/last.safetensors   full training state (resume; without the optimizer state once
                                   finished, with train.keep_optimizer_state=false)
    checkpoints/best.safetensors   model and method state at the best development score
    metrics.jsonl                  one JSON record per logged step and evaluation
    results.json                   final per-language UAS/LAS/UPOS
    predictions/<code>-<split>.conllu
    tokenizer/                     the tiny model's trained tokenizer
    analysis/gradient_conflict.jsonl  languages' gradient cosines every analysis.conflict_every steps
    analysis/cka_{before,after}.json  linear CKA between languages (analysis.cka_sentences)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from subnets.analysis.conflict import conflict_matrix, probe_batches
from subnets.analysis.similarity import cka_record
from subnets.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from subnets.config import SettingError, setting, validate_config
from subnets.data.batching import Collator
from subnets.data.dataset import Batcher, LanguageData
from subnets.data.languages import load_run_data, treebank_cache, treebank_root
from subnets.data.sampling import LanguageSampler
from subnets.distributed import DataParallel
from subnets.evaluate import evaluate
from subnets.fewshot import few_shot
from subnets.files import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl
from subnets.guards import DivergenceGuard, LossGuard
from subnets.identity import config_differences, data_fingerprint, identity_differences, model_fingerprint
from subnets.methods.base import Method, Outputs, SourceLanguages, TrainingBatches
from subnets.methods.episodes import MAMLEpisodes
from subnets.models.build import build_encoder, build_model
from subnets.models.encoder import max_subwords
from subnets.progress import Clock, bar, duration, run_log
from subnets.results import format_results
from subnets.runfolder import RunFolder
from subnets.tracking import Tracker
from subnets.update import StepResult, linear_schedule, parameter_groups

log = logging.getLogger(__name__)


def build_method(cfg: DictConfig) -> Method:
    """The method of ``cfg.method``: its mask policy and step strategy built from their ``_target_``."""
    return Method(str(cfg.method.name), instantiate(cfg.method.policy), instantiate(cfg.method.step))


def resolve_device(name: str, parallel: DataParallel | None = None) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else the CPU; under ``torchrun``,
    ``cuda`` is each process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and parallel is not None and parallel.world_size > 1:
        name = f"cuda:{parallel.local_rank}"
    return torch.device(name)


def check_method_settings(cfg: DictConfig, method: Method) -> None:
    """Refuse ``masks.path`` for a method whose policy would not read it, ``masks.after_steps``
    for one that searches its masks before training only (dynamic.init=static), an
    ``after_steps`` that contradicts ``masks.path`` or leaves no masked training, and
    ``train.compile`` with second-order MAML."""
    policy = method.policy
    name = f"method {cfg.method.name} ({type(policy).__name__})"
    if cfg.train.compile and isinstance(method.strategy, MAMLEpisodes) and not cfg.meta.first_order:
        raise SettingError("train.compile=true with meta.first_order=false: a compiled encoder has no double "
                           "backward through MAML's inner steps; use first-order MAML or train.compile=false")  # fmt: skip
    if cfg.masks.path and not getattr(policy, "uses_masks_path", False):
        raise SettingError(
            f"masks.path={cfg.masks.path!r} is not used by {name}; only static masks (+method=static, "
            "maml_static, random, maml_random) and dynamic ones starting from them (dynamic.init=static) "
            "read a saved mask set"
        )
    after = cfg.masks.after_steps
    if not after:
        return
    if getattr(policy, "uses_masks_path", False) and not getattr(policy, "uses_after_steps", False):
        raise SettingError(f"masks.after_steps={after} is not supported by {name}: it searches its masks "
                           "before training; only static and random masks (+method=static, maml_static, random, "
                           "maml_random) are searched during training")  # fmt: skip
    if not getattr(policy, "uses_after_steps", False):
        return  # no mask search (like the other masks.* search settings, unused)
    if cfg.masks.path:
        raise SettingError(f"masks.after_steps={after} and masks.path={cfg.masks.path!r}: a loaded mask set "
                           "is used from the first step; set one of them")  # fmt: skip
    if after >= cfg.train.steps:
        raise SettingError(f"masks.after_steps={after}: expected fewer than train.steps={cfg.train.steps}, "
                           "or no step would be trained with the masks")  # fmt: skip


def check_settings(cfg: DictConfig) -> None:
    """The settings alone (:func:`~subnets.config.validate_config`) and those of the method
    (:func:`check_method_settings`): what is refused before any file is read or written."""
    validate_config(cfg)
    check_method_settings(cfg, build_method(cfg))


def check_inputs(cfg: DictConfig) -> None:
    """Everything :meth:`Run.setup` checks before training that needs no run folder: the
    settings, the method, the data (synthetic languages generated into a temporary folder) and
    the model. ``overwrite=true`` calls it before it deletes anything."""
    check_settings(cfg)
    with tempfile.TemporaryDirectory() as folder:
        data = load_run_data(cfg.languages, cfg.fewshot, treebank_root(cfg.languages, Path(folder)), seed=cfg.seed,
                             cache=treebank_cache(cfg.languages))  # fmt: skip
        texts = (" ".join(s.forms) for d in data.train.values() for s in d.sentences)
        transformer, _ = build_encoder(cfg.model, cfg.seed, texts)
        build_model(cfg, transformer)


def _scores_text(scores: Mapping[str, float]) -> str:
    return " ".join(f"{key.upper()} {scores[key]:.2f}" for key in ("uas", "las", "upos") if key in scores)


def validation_metric(scores: dict[str, float]) -> float:
    """LAS for parsing tasks, UPOS accuracy for tagging only."""
    return scores["las"] if "las" in scores else scores["upos"]


class Run:
    """One training run, in the shape of a recipe: :meth:`setup`, :meth:`train`,
    :meth:`final_evaluation`, :meth:`save_checkpoint`.

    Attributes (after :meth:`setup`): ``model``, ``optimizer``, ``scheduler``, ``sampler``,
    ``method`` (its ``policy`` and ``strategy``), ``batcher``, ``tokenizer``, ``data`` (the
    languages, :class:`~subnets.data.languages.RunData`), ``parallel`` (this process's place
    in a ``torchrun`` job, :mod:`subnets.distributed`).
    """

    def __init__(self, cfg: DictConfig, folder: str | os.PathLike):
        self.cfg = cfg
        self.folder = Path(folder)
        self.step = 0
        self.clock = Clock()  # seconds per phase, for results.json
        self.started = time.perf_counter()
        self.best: dict[str, Any] | None = None  # {"metric": float, "step": int}
        self.parallel = DataParallel()
        self.tracker = Tracker(self.folder, enabled=False)
        divergence = DivergenceGuard(cfg.train.divergence_factor, cfg.train.divergence_patience)
        self.guard = LossGuard(self.folder, cfg.train.max_nonfinite_steps, divergence, self.last_checkpoint)

    # ------------------------------------------------------------------ setup
    def setup(self, record: Mapping[str, str] | None = None) -> None:
        """Check the settings, load the data and the model, build the method and the optimizer,
        and resume from the folder's last checkpoint. A folder that holds another run (other
        settings, data or model, :mod:`subnets.identity`) is refused before anything in it is
        written; ``record`` (relative path -> text, e.g. Hydra's ``.hydra/*.yaml``) is written
        into the folder once it is accepted, unless it is there already."""
        cfg = self.cfg
        validate_config(cfg)
        self.method = build_method(cfg)
        policy = self.method.policy
        check_method_settings(cfg, self.method)
        saved = self._saved_identity()
        self.folder.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.parallel = DataParallel.from_environment(cfg.train.device)
        main = self.parallel.is_main
        self.tracker = Tracker(self.folder, enabled=main)
        self.device = resolve_device(cfg.train.device, self.parallel)
        started = time.perf_counter()
        if not main:
            self.parallel.barrier()  # rank 0 writes the data and the tokenizer first
        cache = treebank_cache(cfg.languages)
        self.data = load_run_data(cfg.languages, cfg.fewshot, treebank_root(cfg.languages, self.folder),
                                  seed=cfg.seed, needs_support=policy.needs_support, cache=cache)  # fmt: skip
        texts = (" ".join(s.forms) for d in self.data.train.values() for s in d.sentences)
        transformer, self.tokenizer = build_encoder(cfg.model, cfg.seed, texts, self.folder / "tokenizer")
        identity = {
            "config": self._config_container(),
            "data": data_fingerprint([d.path for d in self.data.all() if d.path], self.data.root),
            "model": model_fingerprint(transformer, self.tokenizer),
        }
        if saved is not None:
            self._refuse(identity_differences(saved, identity))
        if main:
            self.parallel.barrier()
        self.data.tokenize(self.tokenizer, cache)
        if cfg.model.freeze_embeddings and cfg.model.name_or_path == "tiny":
            log.warning("model.freeze_embeddings=true on the tiny model freezes its random initial "
                        "embeddings (the default job loses about 8 development LAS); the setting is "
                        "meant for pretrained encoders")  # fmt: skip
        self.model = build_model(cfg, transformer).to(self.device)
        self.collator = Collator(
            self.tokenizer, self._max_subwords(transformer), causal=self.model.gates.layout.causal
        )
        self.batcher = Batcher(self.collator, self.device, cfg.seed)
        if cfg.train.compile:  # in place: parameter names, head-gate hooks and checkpoints are unchanged
            self.model.encoder.transformer.compile()
        policy.bind(self.model, self.batcher, list(self.data.train))
        self.method.strategy.bind(self.model)
        self.optimizer, self.scheduler = self._optimizer()
        sizes = {code: len(data) for code, data in self.data.train.items()}
        small = [f"{code} ({n})" for code, n in sizes.items() if n < self.parallel.world_size]
        if small:
            raise ValueError(f"{self.parallel.world_size} processes need at least as many training sentences "
                             f"per language; too few in {', '.join(small)}")  # fmt: skip
        self.sampler = LanguageSampler(sizes, cfg.train.batch_size, cfg.train.sampling_alpha, cfg.seed)
        self.batches = TrainingBatches(self.sampler, self.data.train, self.batcher, self.parallel)
        self._record(identity, record)
        self.resumed = self._resume()
        self.clock.add("setup", time.perf_counter() - started)
        if main:
            self.tracker.start_wandb(cfg.wandb, cfg.name, self._config_container())
            with self.clock("mask_search"):
                policy.prepare(self.model, self.source_languages(), self.outputs)
            if cfg.analysis.cka_sentences > 0 and not self.resumed:
                with self.clock("analyses"):
                    self.measure_cka("before")
        if self.parallel.world_size > 1:  # every process starts from rank 0's masks and model
            state = self.parallel.broadcast(self.method.state_dict() if main else None)
            if not main:
                self.method.load_state_dict(state)
                policy.prepare(self.model, self.source_languages(), self.outputs)
            self.parallel.broadcast_parameters(self.model)

    def setup_evaluation(self, trained) -> None:
        """Set up to evaluate a trained run (:class:`~subnets.trained.TrainedRun`: its model,
        tokenizer and method) on this run's languages, with no training; only this run's folder
        is written (its data, for synthetic languages)."""
        cfg = self.cfg
        self.method, self.model, self.tokenizer = trained.method, trained.model, trained.tokenizer
        self.batcher, self.collator, self.device = trained.batcher, trained.collator, trained.batcher.device
        self.step, self.best = trained.step, trained.best
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.clock("setup"):
            cache = treebank_cache(cfg.languages)
            self.data = load_run_data(cfg.languages, cfg.fewshot, treebank_root(cfg.languages, self.folder),
                                      seed=cfg.seed, needs_support=self.method.policy.needs_support,
                                      read_train=False, cache=cache)  # fmt: skip
            self.data.tokenize(self.tokenizer, cache)
        with self.clock("final_evaluation"):
            self.method.policy.prepare_evaluation(self.model, self.data.support)

    def _max_subwords(self, transformer) -> int:
        limit = max_subwords(transformer, self.tokenizer)
        configured = self.cfg.model.max_subwords
        if configured and configured > limit:
            raise ValueError(f"model.max_subwords={configured} exceeds the encoder's limit {limit}")
        return configured or limit

    def make_optimizer(self, model: torch.nn.Module, extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
        """``train.optimizer`` over ``model``'s parameter groups (encoder and head rates, no decay
        on biases and LayerNorm) and ``extra_groups``."""
        train = self.cfg.train
        groups = parameter_groups(model, train.lr_encoder, train.lr_head, train.weight_decay)
        return instantiate(train.optimizer)([*groups, *extra_groups])

    def _optimizer(self):
        extra = [*self.method.strategy.parameter_groups(), *self.method.policy.parameter_groups()]
        optimizer = self.method.policy.wrap_optimizer(self.make_optimizer(self.model, extra), self.model)
        train = self.cfg.train
        decay = setting(train.schedule) == "linear"
        return optimizer, linear_schedule(optimizer, train.warmup_steps, train.steps, decay)

    def source_languages(self) -> SourceLanguages:
        """What a mask policy may use before training (:class:`~subnets.methods.SourceLanguages`)."""
        batch_size = self.cfg.train.eval_batch_size

        def dev_metric(model, data: LanguageData, gates) -> float:
            return validation_metric(evaluate(model, data, self.collator, batch_size, gates))

        dev = {code: data for (role, code), data in self.data.evaluated.items() if role == "source"}
        return SourceLanguages(
            self.data.train, dev, dev_metric, self.make_optimizer, self.cfg.train.batch_size
        )

    @property
    def outputs(self) -> Outputs:
        """The run folder and the logger, for the method's own files and figures."""
        return Outputs(self.folder, self.log)

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.safetensors"

    @property
    def best_checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "best.safetensors"

    def _config_container(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)

    def save_checkpoint(self) -> Path:
        """Write the full training state to ``checkpoints/last.safetensors`` (rank 0 only)."""
        if not self.parallel.is_main:
            return self.last_checkpoint
        state = {
            "step": self.step,
            "config": self._config_container(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "method": self.method.state_dict(),
            "best": self.best,
            "divergence": self.guard.state_dict(),
            "rng": rng_state(),
        }
        path = save_checkpoint(self.last_checkpoint, state)
        self.guard.checkpoint_written(self.step, None if self.guard.healthy else False)
        return path

    def drop_optimizer_state(self) -> None:
        """Rewrite the last checkpoint of a finished run without the optimizer state
        (``train.keep_optimizer_state=false``); a no-op where it is already gone."""
        path = self.last_checkpoint
        if not self.parallel.is_main or not path.exists():
            return
        state = load_checkpoint(path)
        if "optimizer" in state:
            before = path.stat().st_size
            del state["optimizer"]
            save_checkpoint(path, state)
            log.info("dropped the optimizer state from %s: %.1f MB -> %.1f MB", path, before / 1e6,
                     path.stat().st_size / 1e6)  # fmt: skip

    @property
    def identity_path(self) -> Path:
        return self.folder / "run.json"

    def _saved_identity(self) -> dict | None:
        """The identity the folder records, checked against the settings before anything is
        written (the data and the model are checked once they are loaded, by :meth:`_accept`)."""
        path = self.identity_path
        if not path.exists():
            if self.last_checkpoint.exists():
                raise ValueError(f"{self.folder} holds a checkpoint but no run.json (a run of an earlier version of "
                                 "subnets): its settings cannot be checked; use another folder (hydra.run.dir=...) "
                                 "or overwrite=true")  # fmt: skip
            return None
        if not self.cfg.resume:
            raise FileExistsError(
                f"{self.folder} already holds a run ({path}); pass resume=true to continue it, "
                "or choose another folder (hydra.run.dir=...)"
            )
        saved = read_json(path, "the run's identity")
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError(f"{path}: expected a JSON object with the run's 'config' (the file is damaged)")
        self._refuse(config_differences(saved["config"], self._config_container()))
        return saved

    def _refuse(self, differences: list[str]) -> None:
        if differences:
            raise ValueError(
                f"{self.folder} holds another run: it differs from this one in\n  " + "\n  ".join(differences)
                + "\nUse the same settings, data and model, another run folder (hydra.run.dir=...) for a new "
                "run, or overwrite=true to replace it."
            )  # fmt: skip

    def _record(self, identity: dict, record: Mapping[str, str] | None) -> None:
        """Write ``run.json`` (once the set-up has checked everything it can check) and ``record``."""
        if not self.parallel.is_main:
            return
        if not self.identity_path.exists():
            atomic_write_json(self.identity_path, identity)
        for name, text in (record or {}).items():
            if not (self.folder / name).exists():
                atomic_write_text(self.folder / name, text)

    def _resume(self) -> bool:
        path = self.last_checkpoint
        if not path.exists():
            self._drop_records_after(None)  # a run killed before its first checkpoint starts again
            return False
        state = load_checkpoint(path, self.device)
        load_model_state(self.model, state["model"], path, f"the settings of {self.identity_path}")
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
        self._drop_records_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _drop_records_after(self, step: int | None) -> None:
        """Drop the metrics and analysis records a killed run logged after ``step`` (all of them
        for ``None``: the run starts again): the resumed run logs them again."""
        if not self.parallel.is_main:
            return
        for path in (self.tracker.metrics_path, self.folder / "analysis" / "gradient_conflict.jsonl"):
            if path.exists():
                kept = [r for r in read_jsonl(path) if step is not None and r.get("step", 0) <= step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

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
        first_step = self.step
        conflict_every = self.cfg.analysis.conflict_every
        if self.step == 0 and conflict_every > 0 and main:
            with clock("analyses"):
                self.measure_conflict()
        while self.step < train.steps:
            with clock("training_steps"):
                result, extra = self.train_step()
            progress.update(1)
            for key, value in {"loss": result.loss, **result.losses, "grad_norm": result.grad_norm,
                               "skipped_steps": float(result.skipped), **extra}.items():  # fmt: skip
                totals[key] = totals.get(key, 0.0) + value
            totals["steps"] = totals.get("steps", 0) + 1
            totals["words"] = totals.get("words", 0) + result.words
            if self.step % train.log_every == 0 or self.step == train.steps:
                seconds = time.perf_counter() - start
                n, words = totals.pop("steps"), totals.pop("words")
                record = {f"train/{k}": v / n for k, v in totals.items()}
                record["train/words_per_second"] = words / seconds
                for group in self.optimizer.param_groups:
                    record[f"lr/{group.get('name', 'group')}"] = group["lr"]
                self.log(record)
                progress.set_postfix(loss=f"{record['train/loss']:.3f}",
                                     words_per_s=f"{record['train/words_per_second']:.0f}")  # fmt: skip
                totals, start = {}, time.perf_counter()
                if main:
                    self._log_progress(record, time.perf_counter() - loop_start, self.step - first_step)
                self.guard.after_interval(self.step, record["train/loss"])
            if main and (self.step % train.eval_every == 0 or self.step == train.steps):
                with clock("dev_evaluation"):
                    self.validate()
            if main and self.step == train.steps:
                policy.on_train_end(self.outputs)
            if main and conflict_every > 0 and self.step % conflict_every == 0:
                with clock("analyses"):
                    self.measure_conflict()
            # While the loss goes wrong, last.safetensors stays the last good state (but at the end).
            if (self.step % train.checkpoint_every == 0 and self.guard.healthy) or self.step == train.steps:
                with clock("checkpoints"):
                    self.save_checkpoint()
        progress.close()

    def _log_progress(self, record: dict[str, float], seconds: float, steps: int) -> None:
        """The log line of a log interval: step, loss, learning rate, speed, elapsed time, ETA."""
        total = self.cfg.train.steps
        lr = self.optimizer.param_groups[0]["lr"]
        eta = seconds / steps * (total - self.step)
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f words/s  elapsed %s  ETA %s", self.step, total,
                 record["train/loss"], lr, record["train/words_per_second"],
                 duration(time.perf_counter() - self.started), duration(eta))  # fmt: skip

    def train_step(self) -> tuple[StepResult, dict[str, float]]:
        """One step of the loop: the method's step, the NaN/inf check and the policy's
        after-step hook (no logging, evaluation or checkpoint); returns the step's result and
        the values the policy logs."""
        train = self.cfg.train
        result = self.method.strategy.step(
            self.model, self.batches, self.optimizer, self.method.policy, batch_size=train.batch_size,
            clip_norm=train.clip_norm, scheduler=self.scheduler, parallel=self.parallel,
        )  # fmt: skip
        self.step += 1
        self.guard.after_step(self.step, result.loss, result.skipped, result.language, result.grad_norm)
        return result, self.method.policy.after_step(self.step, result)

    def validate(self) -> float | None:
        """Evaluate the development languages; keep the best model in ``checkpoints/best.safetensors``."""
        if not self.data.dev:
            return None
        policy = self.method.policy
        policy.prepare_evaluation(self.model, self.data.support)
        record, metrics = {}, []
        for code, data in self.data.dev.items():
            scores = evaluate(
                self.model, data, self.collator, self.cfg.train.eval_batch_size, policy.eval_gates(code)
            )
            metrics.append(validation_metric(scores))
            record.update({f"dev/{code}/{k}": v for k, v in scores.items() if k != "words"})
        metric = float(np.mean(metrics))
        record["dev/metric"] = metric
        self.log(record)
        best = self.best is None or metric > self.best["metric"]
        log.info("development evaluation at step %d: %s; metric %.2f%s", self.step,
                 ", ".join(f"{code} {m:.2f}" for code, m in zip(self.data.dev, metrics)), metric,
                 " (best so far)" if best else "")  # fmt: skip
        if best:
            self.best = {"metric": metric, "step": self.step}
            state = {"step": self.step, "metric": metric, "config": self._config_container(),
                     "model": self.model.state_dict(), "method": self.method.state_dict()}  # fmt: skip
            save_checkpoint(self.best_checkpoint, state)
        return metric

    # ------------------------------------------------------------------ evaluation
    def final_evaluation(self) -> dict[str, Any]:
        """Evaluate the best model on every language and split; write predictions and results.json."""
        if self.best is not None:
            if not self.best_checkpoint.exists():
                raise FileNotFoundError(
                    f"{self.best_checkpoint} is missing, but the run recorded a best model at step {self.best['step']}"
                )
            best = load_checkpoint(self.best_checkpoint, self.device)
            self.model.load_state_dict(best["model"])
            self.method.load_state_dict(best["method"])
        with self.clock("final_evaluation"):
            self.method.policy.prepare_evaluation(self.model, self.data.support)
        if self.cfg.analysis.cka_sentences > 0:
            with self.clock("analyses"):
                self.measure_cka("after")
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
        cfg, policy = self.cfg, self.method.policy
        scores: dict[str, dict[str, Any]] = {"source": {}, "dev": {}, "target": {}}
        with self.clock("final_evaluation"):
            for (role, code), data in self.data.evaluated.items():
                path = self.folder / "predictions" / f"{code}-{data.split}.conllu"
                started = time.perf_counter()
                result = evaluate(
                    self.model, data, self.collator, cfg.train.eval_batch_size, policy.eval_gates(code), path
                )
                scores[role][code] = {"split": data.split, **result}
                log.info("final evaluation, %s language %s (%s, %d words): %s (%.1f s)", role, code, data.split,
                         result["words"], _scores_text(result), time.perf_counter() - started)  # fmt: skip
        results = {
            "method": self.method.name,
            "seed": cfg.seed,
            "data": setting(cfg.languages.source),
            "steps": self.step,
            "best_step": self.best["step"] if self.best else None,
            "dev_metric": self.best["metric"] if self.best else None,
            **about,
            "skipped_sentences": self.data.skipped,
            "support": {
                code: {"split": d.split, "sentences": len(d)} for code, d in self.data.support.items()
            },
            **policy.summary(),
            **scores,
        }
        for role in ("dev", "target"):
            if scores[role]:
                first = next(iter(scores[role].values()))
                results[f"{role}_mean"] = {key: float(np.mean([s[key] for s in scores[role].values()]))
                                           for key in ("uas", "las", "upos") if key in first}  # fmt: skip
        if self.data.target_test and cfg.fewshot.repetitions > 0:
            with self.clock("few_shot"):
                results["fewshot"] = self.few_shot()
        results["seconds"] = {**self.clock.rounded(), "total": round(time.perf_counter() - self.started, 2)}
        atomic_write_json(self.folder / "results.json", results)
        self.log({f"final/{role}/{code}/{k}": v for role in scores for code, s in scores[role].items()
                  for k, v in s.items() if k not in ("split", "words")})  # fmt: skip
        return results

    def few_shot(self) -> dict[str, Any]:
        """The few-shot protocol (:func:`subnets.fewshot.few_shot`) on the target languages with
        the current model and the method's test-time policy; predictions of repetition 0 go to
        ``predictions/fewshot/``."""
        cfg = self.cfg
        return few_shot(
            self.model, self.method.policy, self.data.target_test, self.data.treebanks, self.batcher, self.tokenizer,
            cfg.fewshot, seed=cfg.seed, clip_norm=cfg.train.clip_norm, eval_batch_size=cfg.train.eval_batch_size,
            on_error=setting(cfg.languages.on_error), pools=self.data.support_pools,
            predictions=self.folder / "predictions" / "fewshot",
        )  # fmt: skip

    # ------------------------------------------------------------------ analyses
    def measure_conflict(self) -> dict[str, Any]:
        """Cosines between the training languages' gradients of the shared parameters at this
        step (:func:`subnets.analysis.conflict_matrix`; each language's batch of
        ``analysis.conflict_batch_size`` sentences is fixed by seed and step, its gates and update
        mask are the method's), appended to ``analysis/gradient_conflict.jsonl``."""
        policy, size = self.method.policy, self.cfg.analysis.conflict_batch_size
        batches = probe_batches(self.data.train, self.batcher, size, self.cfg.seed, self.step)
        record = conflict_matrix(self.model, batches, gates=policy.eval_gates, update_mask=policy.update_mask)
        record = {"step": self.step, "method": self.method.name, **record}
        append_jsonl(self.folder / "analysis" / "gradient_conflict.jsonl", record)
        self.log(
            {
                "analysis/negative_share": record["negative_share"],
                "analysis/mean_cosine": record["mean_cosine"],
            }
        )
        return record

    def measure_cka(self, when: str) -> dict[str, Any] | None:
        """Linear CKA between the languages that share evaluated sentences
        (:func:`subnets.analysis.similarity.cka_record`, up to ``analysis.cka_sentences``),
        written to ``analysis/cka_<when>.json``. ``before`` (at the start) uses the pretrained
        encoder with every head; later calls use each language's evaluation gates."""
        datasets = {code: data for (_, code), data in self.data.evaluated.items()}
        gates = (lambda lang: None) if when == "before" else self.method.policy.eval_gates
        record = cka_record(self.model, datasets, self.collator, self.cfg.train.eval_batch_size,
                            self.cfg.analysis.cka_sentences, gates)  # fmt: skip
        if record is None:
            log.warning("analysis.cka_sentences: no two evaluated languages share sentence ids; no CKA")
            return None
        record = {"step": self.step, **record}
        atomic_write_json(self.folder / "analysis" / f"cka_{when}.json", record)
        return record


def run(
    cfg: DictConfig, folder: str | os.PathLike, record: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Set up, train, evaluate; returns the results (also in ``folder/results.json``).

    The folder is locked for the whole run (:meth:`RunFolder.lock`: a second command on it is
    refused, naming the holder). A run folder that already holds a checkpoint is resumed
    (``resume=true``); one whose training finished and whose results exist is not run again,
    unless ``overwrite=true``, which first checks the new settings, data and model
    (:func:`check_inputs`) and then deletes the folder's earlier outputs. ``record``: files
    written into the folder once it is accepted (:meth:`Run.setup`). Under ``torchrun`` every
    process trains; rank 0 holds the lock, evaluates and returns the results, the others return
    an empty dict. An error is also written to the folder's ``train.log``.
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
