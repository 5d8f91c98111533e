"""A run's final results: every evaluated language scored (predictions in the run folder), the
few-shot protocol, and ``results.json``, the same for a trained run's final evaluation and for
``python -m subnets.evaluate``. Both hand over what is evaluated as an
[Evaluation][subnets.evaluate.results.Evaluation]: a model, its method, task and data, and where to write."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from omegaconf import DictConfig
from torch import nn

from subnets.config import setting
from subnets.data.dataset import Batcher
from subnets.data.languages import RunData
from subnets.evaluate import Evaluator
from subnets.evaluate.fewshot import few_shot
from subnets.files import atomic_write_json
from subnets.methods.base import Method
from subnets.progress import Clock
from subnets.runs.folder import RunFolder
from subnets.tasks.base import Task


@dataclass
class Evaluation:
    """What a final evaluation scores and where it writes.

    Attributes: ``cfg`` (the run's settings: seed, languages, few-shot protocol, clip norm),
    ``model`` with its ``method`` (whose test-time policy must be prepared: ``prepare_evaluation``),
    ``task``, ``data`` (the evaluated languages and the few-shot pools), ``batcher`` and ``tokenizer``,
    ``paths`` (the folder results.json and predictions go to), ``step`` and ``best`` (the training
    step evaluated and the best development result, as the training state holds them), ``is_main``
    (False: a sharded run's other processes, which score but write nothing), ``clock`` and
    ``started`` (seconds per phase, for results.json), ``log`` (where the final scores are logged)."""

    cfg: DictConfig
    model: nn.Module
    method: Method
    task: Task
    data: RunData
    batcher: Batcher
    tokenizer: Any
    paths: RunFolder
    step: int
    best: Mapping[str, Any] | None
    is_main: bool = True
    clock: Clock = field(default_factory=Clock)
    started: float = field(default_factory=time.perf_counter)
    log: Callable[[dict[str, Any]], None] = lambda record: None

    @cached_property
    def evaluator(self) -> Evaluator:
        return Evaluator(self.task, self.batcher.collator, self.cfg.train.eval_batch_size)


def write_results(evaluation: Evaluation, about: Mapping[str, Any]) -> dict[str, Any]:
    """Score ``evaluation``'s model on every evaluated language, predictions into ``predictions/``,
    run the few-shot protocol, and write ``results.json`` (rank 0), with the entries of ``about``
    after the step and the best model."""
    cfg, policy, data, task, evaluator = (
        evaluation.cfg, evaluation.method.policy, evaluation.data, evaluation.task, evaluation.evaluator)  # fmt: skip
    paths, main = evaluation.paths, evaluation.is_main
    with evaluation.clock("final_evaluation"):
        scores = evaluator.languages(evaluation.model, data.evaluated, policy.eval_gates,
                                     lambda code, split: paths.predictions(f"{code}-{split}{task.prediction_suffix}")
                                     if main else None)  # fmt: skip
    best = evaluation.best
    support = {code: {"split": d.split, "sentences": len(d)} for code, d in data.support.items()}
    role = {"order": cfg.method.report_order, "control_of": cfg.method.control_of}  # declared by the method
    results = {"method": evaluation.method.name, "method_role": role, "task": task.describe(), "seed": cfg.seed,
               "data": setting(cfg.languages.source), "steps": evaluation.step,
               "best_step": best["step"] if best else None, "dev_metric": best["metric"] if best else None,
               **about, "skipped_sentences": data.skipped, "support": support,
               "parameters": policy.parameter_budget(evaluation.model, list(cfg.languages.train)),
               **policy.summary(), **scores, **evaluator.means(scores)}  # fmt: skip
    if data.target_test and cfg.fewshot.repetitions > 0:
        with evaluation.clock("few_shot"):
            results["fewshot"] = few_shot_results(evaluation)
    results["seconds"] = {
        **evaluation.clock.rounded(),
        "total": round(time.perf_counter() - evaluation.started, 2),
    }
    if main:
        atomic_write_json(paths.results, results)
    evaluation.log({f"final/{role}/{code}/{k}": v for role in scores for code, s in scores[role].items()
                    for k, v in s.items() if k not in ("split", task.count)})  # fmt: skip
    return results


def few_shot_results(evaluation: Evaluation) -> dict[str, Any]:
    """The few-shot protocol ([subnets.evaluate.fewshot.few_shot][]) on ``evaluation``'s target languages with
    its model and its method's test-time policy; predictions of repetition 0 go to
    ``predictions/fewshot/`` (rank 0)."""
    cfg, data = evaluation.cfg, evaluation.data
    predictions = evaluation.paths.predictions("fewshot") if evaluation.is_main else None
    return few_shot(evaluation.model, evaluation.method.policy, data.target_test, data.support_pools,
                    evaluation.batcher, evaluation.tokenizer, cfg.fewshot, evaluation.evaluator, seed=cfg.seed,
                    clip_norm=cfg.train.clip_norm, predictions=predictions)  # fmt: skip
