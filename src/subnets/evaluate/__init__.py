"""Prediction and scoring on one language, for any task, and the [Evaluator][subnets.evaluate.Evaluator] that
validation, the final evaluation and ``python -m subnets.evaluate`` share."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.data.dataset import LanguageData
from subnets.progress import bar

log = logging.getLogger(__name__)


def predict(
    model: nn.Module,
    data: LanguageData,
    collator: Callable,
    batch_size: int = 128,
    gates: torch.Tensor | None = None,
) -> list:
    """The model's prediction for every example of ``data``, in order, under unit ``gates`` if
    given. Examples are batched by length for speed; the model is left in the mode it was in."""
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: sum(len(p) for p in data.pieces[i]))
    predictions: list = [None] * len(data)
    was_training = model.training
    model.eval()
    progress = bar(-(-len(order) // batch_size), f"evaluate {data.code}-{data.split}", "batch")
    try:
        with model.gates.applied(gates):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = collator(
                    [data.examples[i] for i in chunk], [data.pieces[i] for i in chunk], data.code
                )
                for i, prediction in zip(chunk, model.predict(batch.to(device))):
                    predictions[i] = prediction
                progress.update(1)
    finally:
        progress.close()
        model.train(was_training)
    return predictions


def evaluate(
    model: nn.Module,
    data: LanguageData,
    collator: Callable,
    task: Any,
    batch_size: int = 128,
    gates: torch.Tensor | None = None,
    predictions_path: str | os.PathLike | None = None,
) -> dict[str, float]:
    """The ``task``'s scores ([score][subnets.tasks.base.Task.score]) of ``model`` on ``data``; with
    ``predictions_path``, its predictions are written there in the task's format
    ([write_predictions][subnets.tasks.base.Task.write_predictions])."""
    predictions = predict(model, data, collator, batch_size, gates)
    if predictions_path is not None:
        task.write_predictions(predictions_path, data.examples, predictions)
    return task.score(data.examples, predictions)


def scores_text(scores: Mapping[str, float], metrics) -> str:
    """``UAS 80.00 LAS 75.00``: the metrics of ``scores``, for log lines."""
    return " ".join(f"{key.upper()} {scores[key]:.2f}" for key in metrics if key in scores)


class Evaluator:
    """Scores a model on languages with a task, the same way for development evaluations
    during training, the final evaluation and the evaluation of a trained run.

    Args:
        task: the run's [Task][subnets.tasks.Task].
        collator: the task's collator for the model's encoder.
        batch_size: ``train.eval_batch_size``.
    """

    def __init__(self, task: Any, collator: Callable, batch_size: int):
        self.task, self.collator, self.batch_size = task, collator, batch_size

    def score(self, model: nn.Module, data: LanguageData, gates=None, predictions=None) -> dict[str, float]:
        """[evaluate][subnets.evaluate.evaluate] of one language."""
        return evaluate(model, data, self.collator, self.task, self.batch_size, gates, predictions)

    def metric(self, model: nn.Module, data: LanguageData, gates=None) -> float:
        """The primary metric of one language (iterative pruning's development metric)."""
        return self.task.primary_of(self.score(model, data, gates))

    def development(
        self, model: nn.Module, dev: Mapping[str, LanguageData], gates
    ) -> tuple[dict[str, float], dict]:
        """The primary metric of each development language (their mean selects checkpoints) and
        the record to log (``dev/<code>/<metric>``, ``dev/metric``); ``gates(code)`` per language."""
        record, metrics = {}, {}
        for code, data in dev.items():
            scores = self.score(model, data, gates(code))
            metrics[code] = self.task.primary_of(scores)
            record.update({f"dev/{code}/{k}": v for k, v in scores.items() if k != self.task.count})
        record["dev/metric"] = float(np.mean(list(metrics.values())))
        return metrics, record

    def languages(self, model: nn.Module, evaluated: Mapping[tuple[str, str], LanguageData], gates,
                  predictions) -> dict[str, dict[str, Any]]:  # fmt: skip
        """Scores of every ``(role, code)`` language (``predictions(code, split)``: where its
        predictions go), by role: ``{"source": {code: scores}, "dev": ..., "target": ...}``."""
        scores: dict[str, dict[str, Any]] = {"source": {}, "dev": {}, "target": {}}
        for (role, code), data in evaluated.items():
            started = time.perf_counter()
            result = self.score(model, data, gates(code), predictions(code, data.split))
            scores[role][code] = {"split": data.split, **result}
            log.info("final evaluation, %s language %s (%s, %d %s): %s (%.1f s)", role, code, data.split,
                     result[self.task.count], self.task.count, scores_text(result, self.task.metrics),
                     time.perf_counter() - started)  # fmt: skip
        return scores

    def means(self, scores: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """``source_mean``, ``dev_mean`` and ``target_mean``: each metric's mean over the role's
        languages; ``source_best``: the source language with the best primary metric, and its scores."""
        out = {}
        for role in ("source", "dev", "target"):
            if scores.get(role):
                out[f"{role}_mean"] = {key: float(np.mean([s[key] for s in scores[role].values()]))
                                       for key in self.task.metrics}  # fmt: skip
        if scores.get("source"):
            pick = min if self.task.lower_is_better else max
            code = pick(scores["source"], key=lambda c: scores["source"][c][self.task.primary])
            out["source_best"] = {
                "language": code,
                **{k: scores["source"][code][k] for k in self.task.metrics},
            }
        return out
