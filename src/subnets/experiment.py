"""The experiment recipe: set up data and model, train with a method, evaluate, checkpoint, resume.

:func:`run` is what ``python -m subnets.train`` calls; it needs a config (see
:mod:`subnets.config`) and a run folder, not Hydra, so a notebook can call it too. Everything a
run produces lands in the run folder::

    checkpoints/last.safetensors   full training state (resume)
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
import random
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from subnets.analysis.conflict import conflict_matrix
from subnets.analysis.similarity import cka_matrix, parallel_sentence_ids, sentence_representations
from subnets.checkpoint import load_checkpoint, save_checkpoint
from subnets.data.batching import Batch, Collator
from subnets.data.dataset import LanguageData, load_language
from subnets.data.sampling import LanguageSampler
from subnets.data.synthetic import SyntheticLanguage, write_synthetic_treebanks
from subnets.data.ud import TreebankFiles, discover_treebanks, manifest_targets, select_treebanks
from subnets.distributed import DataParallel
from subnets.evaluate import evaluate
from subnets.fewshot import check_support, draw_support, few_shot
from subnets.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from subnets.methods.base import build_method, setting
from subnets.models.encoder import (
    Encoder,
    build_tiny_transformer,
    load_pretrained,
    max_subwords,
    train_subword_tokenizer,
)
from subnets.models.parser import DependencyParser
from subnets.training import DivergenceGuard, linear_schedule, parameter_groups

log = logging.getLogger(__name__)

# Settings that may change between a run and its resumption without changing its results.
RESUME_IGNORED = (
    "resume",
    "overwrite",
    "wandb.",
    "train.device",
    "train.log_every",
    "train.eval_batch_size",
    "languages.ud_root",
    "analysis.",
)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flat(container: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(container, dict):
        out = {}
        for key, value in container.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: container}


class Experiment:
    """One training run, in the shape of a recipe: :meth:`setup`, :meth:`train`,
    :meth:`final_evaluation`, :meth:`save_checkpoint`.

    Attributes (after :meth:`setup`): ``model``, ``optimizer``, ``scheduler``, ``sampler``,
    ``method``, ``collator``, ``tokenizer``, ``parallel`` (this process's place in a
    ``torchrun`` job, :mod:`subnets.distributed`), and the data: ``train_data`` (source
    languages, train split), ``dev_data`` (development languages, dev split), ``eval_data``
    (every language and split evaluated at the end, keyed ``(role, code)``).
    """

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.step = 0
        self.best: dict[str, Any] | None = None  # {"metric": float, "step": int}
        self.wandb_run = None
        self.parallel = DataParallel()
        self.nonfinite_in_a_row = 0
        self.checkpoint_step: int | None = None  # the step checkpoints/last.safetensors holds
        self.divergence = DivergenceGuard(cfg.train.divergence_factor, cfg.train.divergence_patience)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.parallel = DataParallel.from_environment(cfg.train.device)
        main = self.parallel.is_main
        self.device = self._device(cfg.train.device)
        self.method = build_method(cfg)
        if not main:
            self.parallel.barrier()  # rank 0 writes the data and the tokenizer first
        self.treebanks, self.data_root = self._treebanks()
        self._load_data()
        transformer, self.tokenizer = self._encoder()
        if main:
            self.parallel.barrier()
        self.support: dict[str, LanguageData] = {}
        if self.method.needs_support:
            self._draw_support()
        for data in [*self._all_data(), *self.support.values()]:
            data.tokenize(self.tokenizer)
        limit = max_subwords(transformer, self.tokenizer)
        if cfg.model.max_subwords:
            if cfg.model.max_subwords > limit:
                raise ValueError(
                    f"model.max_subwords={cfg.model.max_subwords} exceeds the encoder's limit {limit}"
                )
            limit = cfg.model.max_subwords
        self.collator = Collator(self.tokenizer, limit)
        if cfg.model.encoder_dropout is not None:
            for module in transformer.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = cfg.model.encoder_dropout
        encoder = Encoder(transformer, cfg.model.mix_dropout)
        task = cfg.task
        self.model = DependencyParser(
            encoder, setting(task.name), task.arc_dim, task.label_dim, task.dropout, task.word_dropout
        ).to(self.device)
        self.method.attach(self)
        self.optimizer, self.scheduler = self._optimizer()
        sizes = {code: len(data) for code, data in self.train_data.items()}
        small = [f"{code} ({n})" for code, n in sizes.items() if n < self.parallel.world_size]
        if small:
            raise ValueError(f"{self.parallel.world_size} processes need at least as many training sentences "
                             f"per language; too few in {', '.join(small)}")  # fmt: skip
        self.sampler = LanguageSampler(sizes, cfg.train.batch_size, cfg.train.sampling_alpha, cfg.seed)
        self.resumed = self._resume()
        if main:
            self._init_wandb()
            self.method.setup(self)
            if self.cfg.analysis.cka_sentences > 0 and not self.resumed:
                self.measure_cka("before")
        if self.parallel.world_size > 1:  # every process starts from rank 0's masks and model
            state = self.parallel.broadcast(self.method.state_dict() if main else None)
            if not main:
                self.method.load_state_dict(state)
                self.method.setup(self)
            self.parallel.broadcast_parameters(self.model)

    def _device(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.parallel.world_size > 1:
            name = f"cuda:{self.parallel.local_rank}"
        return torch.device(name)

    def _treebanks(self) -> tuple[dict[str, TreebankFiles], Path]:
        languages = self.cfg.languages
        if setting(languages.source) == "synthetic":
            synthetic = languages.synthetic
            specs = {code: SyntheticLanguage(code, **spec) for code, spec in synthetic.languages.items()}
            root = write_synthetic_treebanks(
                self.run_dir / "data",
                specs,
                {"train": synthetic.train, "dev": synthetic.dev, "test": synthetic.test},
                synthetic.seed,
            )
        else:
            configured = languages.ud_root or os.environ.get("SUBNETS_UD_ROOT")
            if not configured:
                raise ValueError(
                    "languages.source=ud needs languages.ud_root or the SUBNETS_UD_ROOT variable"
                )
            root = Path(configured).expanduser()
        return discover_treebanks(root), root

    def _load_data(self) -> None:
        languages, treebanks, root = self.cfg.languages, self.treebanks, self.data_root
        on_error = setting(languages.on_error)
        if not languages.train:
            raise ValueError("languages.train is empty: name at least one training language")

        def load(code: str, split: str, cap: int | None) -> LanguageData:
            return load_language(treebanks[code], split, on_error, cap)

        train = select_treebanks(treebanks, languages.train, "languages.train", root)
        dev = select_treebanks(treebanks, languages.dev, "languages.dev", root)
        target_codes = list(languages.target)
        if target_codes == ["auto"]:
            target_codes = manifest_targets(root, treebanks, [*languages.train, *languages.dev])
        target = select_treebanks(treebanks, target_codes, "languages.target", root)
        for tb in train:
            if "train" not in tb.files:
                raise ValueError(f"languages.train: {tb.code} has no train split in {tb.folder}")
        for tb in dev:
            if "dev" not in tb.files:
                raise ValueError(f"languages.dev: {tb.code} has no dev split in {tb.folder}")
        for tb in target:
            if "test" not in tb.files:
                raise ValueError(f"languages.target: {tb.code} has no test split in {tb.folder}")
        self.train_data = {tb.code: load(tb.code, "train", languages.max_train_sentences) for tb in train}
        cap = languages.max_eval_sentences
        self.dev_data = {tb.code: load(tb.code, "dev", cap) for tb in dev}
        self.eval_data: dict[tuple[str, str], LanguageData] = {}
        for tb in train:
            if "dev" in tb.files:
                self.eval_data[("source", tb.code)] = load(tb.code, "dev", cap)
        for code, data in self.dev_data.items():
            self.eval_data[("dev", code)] = data
        for tb in target:
            self.eval_data[("target", tb.code)] = load(tb.code, "test", cap)
        # the whole (capped) test split, from which each few-shot repetition draws its support
        self.target_test = {tb.code: self.eval_data[("target", tb.code)] for tb in target}
        if self.cfg.fewshot.repetitions > 0:  # fail now, not after training
            for code, test in self.target_test.items():
                check_support(self.treebanks[code], test, self.cfg.fewshot.k)
        skipped = sum(d.skipped for d in self._all_data())
        if skipped:
            log.warning("skipped %d invalid sentence(s) in total (languages.on_error=skip)", skipped)
        self.skipped_sentences = {f"{d.code}-{d.split}": d.skipped for d in self._all_data() if d.skipped}

    def _draw_support(self) -> None:
        """k support sentences per development and target language (the test-time policy's
        data); when drawn from the evaluated split they are removed from it."""
        for (role, code), data in list(self.eval_data.items()):
            if role == "source":
                continue
            support, rest = draw_support(
                self.treebanks[code],
                data,
                self.cfg.fewshot.k,
                self.cfg.seed,
                setting(self.cfg.languages.on_error),
            )
            self.support[code] = support
            self.eval_data[(role, code)] = rest
            if role == "dev":
                self.dev_data[code] = rest

    def _all_data(self) -> list[LanguageData]:
        unique = {
            id(d): d for d in [*self.train_data.values(), *self.dev_data.values(), *self.eval_data.values()]
        }
        return list(unique.values())

    def _encoder(self):
        model = self.cfg.model
        if model.name_or_path != "tiny":
            return load_pretrained(model.name_or_path, model.attn_implementation)
        from transformers import PreTrainedTokenizerFast

        tiny = model.tiny
        folder = self.run_dir / "tokenizer"
        if (folder / "tokenizer.json").exists():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        else:
            texts = (" ".join(s.forms) for d in self.train_data.values() for s in d.sentences)
            tokenizer = train_subword_tokenizer(texts, tiny.vocab_size, tiny.max_length)
            tokenizer.save_pretrained(folder)
        transformer = build_tiny_transformer(
            len(tokenizer),
            tiny.hidden_size,
            tiny.num_layers,
            tiny.num_heads,
            tiny.intermediate_size,
            tiny.max_length,
            tiny.architecture,
            model.attn_implementation,
            self.cfg.seed,
            tokenizer.pad_token_id,
        )
        return transformer, tokenizer

    def _optimizer(self):
        train = self.cfg.train
        groups = parameter_groups(self.model, train.lr_encoder, train.lr_head, train.weight_decay)
        groups += self.method.parameter_groups()
        optimizer = self.method.wrap_optimizer(torch.optim.AdamW(groups), self.model)
        decay = setting(train.schedule) == "linear"
        return optimizer, linear_schedule(optimizer, train.warmup_steps, train.steps, decay)

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.safetensors"

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "best.safetensors"

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
            "divergence": self.divergence.state_dict(),
            "rng": _rng_state(),
        }
        path = save_checkpoint(self.last_checkpoint, state)
        self.checkpoint_step = self.step
        return path

    def _resume(self) -> bool:
        path = self.last_checkpoint
        if not path.exists():
            return False
        if not self.cfg.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds a run (checkpoint {path}); pass resume=true to continue it, "
                "or choose another folder (hydra.run.dir=...)"
            )
        state = load_checkpoint(path, self.device)
        saved, current = _flat(state["config"]), _flat(self._config_container())
        differences = [
            f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key) and not key.startswith(RESUME_IGNORED)
        ]
        if differences:
            raise ValueError(
                f"cannot resume {path}: the config differs from the one it was trained with:\n  "
                + "\n  ".join(differences)
                + "\nUse the same settings, or another run folder (hydra.run.dir=...) for a new run."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.method.load_state_dict(state["method"])
        self.step, self.best = state["step"], state["best"]
        self.checkpoint_step = self.step
        self.divergence.load_state_dict(state["divergence"])
        _set_rng_state(state["rng"])
        # Records logged after the checkpoint will be logged again by the resumed run.
        metrics = self.run_dir / "metrics.jsonl"
        kept = [r for r in read_jsonl(metrics) if r.get("step", 0) <= self.step]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ logging
    def _init_wandb(self) -> None:
        import wandb

        settings = self.cfg.wandb
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.wandb_run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group or self.cfg.name,
            name=f"{self.cfg.name}/{self.run_dir.name}",
            dir=str(self.run_dir),
            mode=setting(settings.mode),
            config=self._config_container(),
            id=run_id,
            resume="allow",
            tags=list(settings.tags),
        )

    def log(self, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Append ``record`` (with the current step) to metrics.jsonl and send it, and any
        matplotlib ``images``, to W&B."""
        if not self.parallel.is_main:
            return
        record = {"step": self.step, **record}
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self.wandb_run is not None:
            import wandb

            media = {k: wandb.Image(v) for k, v in (images or {}).items()}
            self.wandb_run.log({**{k: v for k, v in record.items() if k != "step"}, **media}, step=self.step)

    def close(self) -> None:
        """Finish the W&B run (each Hydra job gets its own) and leave the process group."""
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        self.parallel.close()

    # ------------------------------------------------------------------ training
    def next_indices(self, lang: str, size: int | None = None) -> list[int]:
        """Sentence indices of this process's next batch of ``lang`` (``size`` defaults to
        ``train.batch_size``): every process draws the same ``size x world_size`` sentences
        and keeps its own share."""
        drawn = self.sampler.next_batch(lang, (size or self.cfg.train.batch_size) * self.parallel.world_size)
        return self.parallel.shard(drawn)

    def batch(self, lang: str, indices: list[int]) -> Batch:
        data = self.train_data[lang]
        return self.collator(
            [data.sentences[i] for i in indices], [data.pieces[i] for i in indices], lang
        ).to(self.device)

    def train(self) -> None:
        """Run the training loop from the current step to ``train.steps``."""
        train = self.cfg.train
        if self.step >= train.steps:
            return
        bar = tqdm(
            total=train.steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=None if self.parallel.is_main else True,
            file=sys.stderr,
        )
        totals: dict[str, float] = {}
        start = time.perf_counter()
        conflict_every = self.cfg.analysis.conflict_every
        if self.step == 0 and conflict_every > 0 and self.parallel.is_main:
            self.measure_conflict()
        while self.step < train.steps:
            result = self.method.step(self)
            self.step += 1
            self._check_finite(result)
            extra = self.method.after_step(self, result)
            bar.update(1)
            for key, value in {
                "loss": result.loss,
                **result.losses,
                "grad_norm": result.grad_norm,
                "skipped_steps": float(result.skipped),
                **extra,
            }.items():
                totals[key] = totals.get(key, 0.0) + value
            totals["steps"] = totals.get("steps", 0) + 1
            totals["words"] = totals.get("words", 0) + result.words
            if self.step % train.log_every == 0 or self.step == train.steps:
                seconds = time.perf_counter() - start
                n = totals.pop("steps")
                words = totals.pop("words")
                record = {f"train/{k}": v / n for k, v in totals.items()}
                record["train/words_per_second"] = words / seconds
                for group in self.optimizer.param_groups:
                    record[f"lr/{group.get('name', 'group')}"] = group["lr"]
                self.log(record)
                bar.set_postfix(loss=f"{record['train/loss']:.3f}")
                totals, start = {}, time.perf_counter()
                self._check_divergence(record["train/loss"])
            main = self.parallel.is_main
            if main and (self.step % train.eval_every == 0 or self.step == train.steps):
                self.validate()
            if main and self.step == train.steps:
                self.method.on_train_end(self)
            if main and conflict_every > 0 and self.step % conflict_every == 0:
                self.measure_conflict()
            # While the loss is flagged as diverging, last.safetensors stays the last good state.
            diverging = self.divergence.in_a_row > 0
            if (self.step % train.checkpoint_every == 0 and not diverging) or self.step == train.steps:
                self.save_checkpoint()
        bar.close()

    def _check_finite(self, result) -> None:
        """Count steps skipped for a NaN or infinite loss; stop after ``train.max_nonfinite_steps``
        in a row (the last checkpoint, written before them, stays as it was)."""
        if not result.skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        log.warning("step %d (%s): loss %s, gradient norm %s; the step was skipped",
                    self.step, result.language, result.loss, result.grad_norm)  # fmt: skip
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            last = f"{self.last_checkpoint}" if self.last_checkpoint.exists() else "none was written"
            raise FloatingPointError(
                f"{self.run_dir}: {self.nonfinite_in_a_row} steps in a row (steps "
                f"{self.step - self.nonfinite_in_a_row + 1}-{self.step}, train.max_nonfinite_steps={limit}) "
                f"had a NaN or infinite loss or gradient; the last good checkpoint is {last}. Lower the "
                "learning rates (train.lr_encoder, train.lr_head) or check the data."
            )

    def _check_divergence(self, loss: float) -> None:
        """Warn about a log interval whose loss is far above its best (:class:`DivergenceGuard`);
        stop after ``train.divergence_patience`` in a row."""
        guard = self.divergence
        if not guard.check(self.step, loss):
            return
        factor = guard.factor
        log.warning("step %d: training loss %.4g is more than %g times its best %.4g (step %d): diverging?",
                    self.step, loss, factor, guard.best, guard.best_step)  # fmt: skip
        if guard.exhausted:
            path = self.last_checkpoint
            last = (
                f"{path} (step {self.checkpoint_step})"
                if self.checkpoint_step is not None
                else "none was written"
            )
            raise FloatingPointError(
                f"{self.run_dir}: the training loss diverged: {guard.in_a_row} log intervals in a row (steps "
                f"{guard.streak_start}-{self.step}) above {factor:g} x its best {guard.best:.4g} (step "
                f"{guard.best_step}); the last was {loss:.4g} (train.divergence_factor={factor:g}, "
                f"train.divergence_patience={guard.patience}). The last good checkpoint is {last}. Lower "
                "the learning rates (train.lr_encoder, train.lr_head, meta.inner_lr_*) or check the data."
            )

    def validation_metric(self, scores: dict[str, float]) -> float:
        """LAS for parsing tasks, UPOS accuracy for ``task=pos``."""
        return scores["las"] if "las" in scores else scores["upos"]

    def validate(self) -> float | None:
        """Evaluate the development languages; keep the best model in ``checkpoints/best.safetensors``."""
        if not self.dev_data:
            return None
        self.method.prepare_evaluation(self)
        record, metrics = {}, []
        for code, data in self.dev_data.items():
            scores = evaluate(
                self.model, data, self.collator, self.cfg.train.eval_batch_size, self.method.eval_gates(code)
            )
            metrics.append(self.validation_metric(scores))
            record.update({f"dev/{code}/{k}": v for k, v in scores.items() if k != "words"})
        metric = float(np.mean(metrics))
        record["dev/metric"] = metric
        self.log(record)
        if self.best is None or metric > self.best["metric"]:
            self.best = {"metric": metric, "step": self.step}
            save_checkpoint(
                self.best_checkpoint,
                {
                    "step": self.step,
                    "metric": metric,
                    "model": self.model.state_dict(),
                    "method": self.method.state_dict(),
                },
            )
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
        self.method.prepare_evaluation(self)
        if self.cfg.analysis.cka_sentences > 0:
            self.measure_cka("after")
        scores: dict[str, dict[str, Any]] = {"source": {}, "dev": {}, "target": {}}
        for (role, code), data in self.eval_data.items():
            path = self.run_dir / "predictions" / f"{code}-{data.split}.conllu"
            result = evaluate(
                self.model,
                data,
                self.collator,
                self.cfg.train.eval_batch_size,
                self.method.eval_gates(code),
                path,
            )
            scores[role][code] = {"split": data.split, **result}
        results = {
            "method": self.method.name,
            "seed": self.cfg.seed,
            "data": setting(self.cfg.languages.source),
            "steps": self.step,
            "best_step": self.best["step"] if self.best else None,
            "dev_metric": self.best["metric"] if self.best else None,
            "skipped_sentences": self.skipped_sentences,
            "diverging_log_intervals": self.divergence.flagged,
            "support": {code: {"split": d.split, "sentences": len(d)} for code, d in self.support.items()},
            **self.method.summary(),
            **scores,
        }
        for role in ("dev", "target"):
            if scores[role]:
                results[f"{role}_mean"] = {
                    key: float(np.mean([s[key] for s in scores[role].values()]))
                    for key in ("uas", "las", "upos")
                    if key in next(iter(scores[role].values()))
                }
        if self.target_test and self.cfg.fewshot.repetitions > 0:
            results["fewshot"] = few_shot(self)
        atomic_write_json(self.run_dir / "results.json", results)
        self.log(
            {
                f"final/{role}/{code}/{k}": v
                for role in scores
                for code, s in scores[role].items()
                for k, v in s.items()
                if k not in ("split", "words")
            }
        )
        return results

    # ------------------------------------------------------------------ analyses
    def measure_conflict(self) -> dict[str, Any]:
        """Cosines between the training languages' gradients of the shared parameters at this
        step (:func:`subnets.analysis.conflict_matrix`; each language's batch of
        ``analysis.conflict_batch_size`` sentences is fixed by seed and step, its gates and update
        mask are the method's), appended to ``analysis/gradient_conflict.jsonl``."""
        size = self.cfg.analysis.conflict_batch_size
        batches = {}
        for lang, data in self.train_data.items():
            rng = random.Random(f"{self.cfg.seed}/conflict/{self.step}/{lang}")
            batches[lang] = self.batch(lang, sorted(rng.sample(range(len(data)), min(size, len(data)))))
        record = conflict_matrix(
            self.model, batches, gates=self.method.eval_gates, update_mask=self.method.update_mask
        )
        record = {"step": self.step, "method": self.method.name, **record}
        append_jsonl(self.run_dir / "analysis" / "gradient_conflict.jsonl", record)
        self.log(
            {
                "analysis/negative_share": record["negative_share"],
                "analysis/mean_cosine": record["mean_cosine"],
            }
        )
        return record

    def measure_cka(self, when: str) -> dict[str, Any] | None:
        """Linear CKA between the languages that share evaluated sentences (the largest such
        group, up to ``analysis.cka_sentences`` sentences; :mod:`subnets.analysis.similarity`),
        written to ``analysis/cka_<when>.json``. ``before`` (at the start) uses the pretrained
        encoder with every head; later calls use each language's evaluation gates."""
        datasets = {code: data for (_, code), data in self.eval_data.items()}
        languages, ids = parallel_sentence_ids(datasets, self.cfg.analysis.cka_sentences)
        if not languages:
            log.warning("analysis.cka_sentences: no two evaluated languages share sentence ids; no CKA")
            return None
        batch_size = self.cfg.train.eval_batch_size
        representations = {
            lang: sentence_representations(self.model, datasets[lang], self.collator, batch_size,
                                           None if when == "before" else self.method.eval_gates(lang), set(ids))
            for lang in languages
        }  # fmt: skip
        languages, matrix = cka_matrix(representations, ids)
        record = {"step": self.step, "languages": languages, "sentences": len(ids), "matrix": matrix.tolist()}
        atomic_write_json(self.run_dir / "analysis" / f"cka_{when}.json", record)
        return record


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of the per-language scores in ``results``."""
    rows = []
    for role in ("source", "dev", "target"):
        for code, s in results.get(role, {}).items():
            rows.append(
                (
                    code,
                    role,
                    s["split"],
                    str(s["words"]),
                    *(f"{s[k]:.2f}" if k in s else "-" for k in ("uas", "las", "upos")),
                )
            )
    for role in ("dev", "target"):
        if f"{role}_mean" in results:
            mean = results[f"{role}_mean"]
            rows.append(
                (
                    "mean",
                    role,
                    "",
                    "",
                    *(f"{mean[k]:.2f}" if k in mean else "-" for k in ("uas", "las", "upos")),
                )
            )
    header = ("language", "role", "split", "words", "UAS", "LAS", "UPOS")
    lines = _table(header, rows)
    fewshot = results.get("fewshot", {})
    if fewshot.get("languages"):
        lines += ["", f"few-shot: k={fewshot['k']} support sentences, {fewshot['steps']} steps, "
                      f"{fewshot['repetitions']} repetitions (mean +- sd)"]  # fmt: skip
        keys = [k for k in ("las", "uas", "upos") if f"{k}_mean" in next(iter(fewshot["languages"].values()))]
        rows = []
        for code, s in fewshot["languages"].items():
            zero = results["target"][code]
            rows.append((code, *(f"{zero[k]:.2f}" for k in keys),
                         *(f"{s[f'{k}_mean']:.2f} +- {s[f'{k}_sd']:.2f}" for k in keys), s["support_split"]))  # fmt: skip
        mean = fewshot["mean"]
        rows.append(
            (
                "mean",
                *(f"{results['target_mean'][k]:.2f}" for k in keys),
                *(f"{mean[k]:.2f}" for k in keys),
                "",
            )
        )
        header = (
            "language",
            *(f"zero-shot {k.upper()}" for k in keys),
            *(f"few-shot {k.upper()}" for k in keys),
            "support from",
        )
        lines += _table(header, rows)
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def run(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Set up, train, evaluate; returns the results (also in ``run_dir/results.json``).

    A run folder that already holds a checkpoint is resumed (``resume=true``); one whose
    training finished and whose results exist is not run again, unless ``overwrite=true``,
    which first deletes the folder's earlier outputs. Under ``torchrun`` every process trains;
    rank 0 evaluates and returns the results, the others return an empty dict.
    """
    results_path = Path(run_dir) / "results.json"
    if cfg.overwrite and int(os.environ.get("RANK", "0")) == 0:
        clear_outputs(run_dir)
    experiment = Experiment(cfg, run_dir)
    try:
        experiment.setup()
        if experiment.resumed and experiment.step >= cfg.train.steps and results_path.exists():
            message = (
                f"{run_dir} already finished; its results are in {results_path} (overwrite=true reruns it)"
            )
            log.info(message)
            print(message)
            return json.loads(results_path.read_text()) if experiment.parallel.is_main else {}
        experiment.train()
        if not experiment.parallel.is_main:
            return {}
        results = experiment.final_evaluation()
    finally:
        experiment.close()
    print(format_results(results))
    return results


def clear_outputs(run_dir: str | os.PathLike) -> None:
    """Delete what a run wrote into ``run_dir`` (Hydra's ``.hydra/`` and log files stay)."""
    for path in Path(run_dir).glob("*"):
        if path.name == ".hydra" or path.suffix == ".log":
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
