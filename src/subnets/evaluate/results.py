"""A run's final results: every evaluated language scored (predictions in the run folder), the
few-shot protocol, and ``results.json``, the same for a trained run's final evaluation and for
``python -m subnets.evaluate``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from subnets.config import setting
from subnets.fewshot import few_shot
from subnets.files import atomic_write_json


def write_results(run, about: Mapping[str, Any]) -> dict[str, Any]:
    """Score ``run``'s current model (a [Run][subnets.runner.Run]: its task, data, method,
    evaluator and folder) on every evaluated language, predictions into ``predictions/``, run the
    few-shot protocol, and write ``results.json``, with the entries of ``about`` after the run's
    step and best model. The method's test-time policy must be prepared (``prepare_evaluation``)."""
    cfg, policy, data, task = run.cfg, run.method.policy, run.data, run.task
    main = run.parallel.is_main  # sharded (train.parallel=fsdp), every process evaluates; rank 0 writes
    with run.clock("final_evaluation"):
        scores = run.evaluator.languages(run.model, data.evaluated, policy.eval_gates,
                                         lambda code, split: run.paths.predictions(f"{code}-{split}{task.prediction_suffix}")
                                         if main else None)  # fmt: skip
    best_step, dev_metric = (
        (run.state.best["step"], run.state.best["metric"]) if run.state.best else (None, None)
    )
    support = {code: {"split": d.split, "sentences": len(d)} for code, d in data.support.items()}
    role = {"order": cfg.method.report_order, "control_of": cfg.method.control_of}  # declared by the method
    results = {"method": run.method.name, "method_role": role, "task": task.describe(), "seed": cfg.seed,
               "data": setting(cfg.languages.source), "steps": run.state.step, "best_step": best_step,
               "dev_metric": dev_metric, **about, "skipped_sentences": data.skipped, "support": support,
               "parameters": policy.parameter_budget(run.model, list(cfg.languages.train)),
               **policy.summary(), **scores, **run.evaluator.means(scores)}  # fmt: skip
    if data.target_test and cfg.fewshot.repetitions > 0:
        with run.clock("few_shot"):
            results["fewshot"] = run_few_shot(run)
    results["seconds"] = {**run.clock.rounded(), "total": round(time.perf_counter() - run.started, 2)}
    if main:
        atomic_write_json(run.paths.results, results)
    run.log({f"final/{role}/{code}/{k}": v for role in scores for code, s in scores[role].items()
             for k, v in s.items() if k not in ("split", task.count)})  # fmt: skip
    return results


def run_few_shot(run) -> dict[str, Any]:
    """The few-shot protocol ([subnets.fewshot.few_shot][]) on ``run``'s target languages with
    its current model and its method's test-time policy; predictions of repetition 0 go to
    ``predictions/fewshot/``."""
    cfg, data = run.cfg, run.data
    return few_shot(run.model, run.method.policy, data.target_test, data.support_pools, run.batcher, run.tokenizer,
                    cfg.fewshot, run.evaluator, seed=cfg.seed, clip_norm=cfg.train.clip_norm,
                    predictions=run.paths.predictions("fewshot") if run.parallel.is_main else None)  # fmt: skip
