"""The few-shot protocol for unseen languages (support sentences: [subnets.data.support][])."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.config import setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.data.support import draw_support
from subnets.evaluate import Evaluator
from subnets.methods.base import MaskPolicy
from subnets.optim.masked import MaskedOptimizer
from subnets.progress import bar
from subnets.training.update import parameter_groups, training_step

log = logging.getLogger(__name__)
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def fine_tune(
    model: torch.nn.Module,
    batch,
    steps: int,
    lr_encoder: float,
    lr_head: float,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    gates: torch.Tensor | None = None,
    update_mask: dict[str, torch.Tensor] | None = None,
    optimizer: str = "adamw",
) -> torch.nn.Module:
    """``steps`` steps of ``optimizer`` (``adamw``, or ``sgd``: plain SGD) on ``model`` (in
    place) on one ``batch`` (or its micro-batches, see
    [micro_batches][subnets.data.dataset.Batcher.micro_batches]), through a masked optimizer when
    ``update_mask`` is given."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"fewshot.optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    groups = parameter_groups(model, lr_encoder, lr_head, weight_decay)
    optimizer = MaskedOptimizer(OPTIMIZERS[optimizer](groups), model.named_parameters())
    for _ in range(steps):
        training_step(model, batch, optimizer, gates=gates, update_mask=update_mask, clip_norm=clip_norm)
    return model


@contextmanager
def restored(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Keep a copy of ``model``'s state (weights and buffers) and its mode; yields a function
    that restores them in place, and restores them on exit."""
    initial, was_training = {k: v.detach().clone() for k, v in model.state_dict().items()}, model.training

    def restore() -> None:
        model.load_state_dict(initial)
        model.train(was_training)

    try:
        yield restore
    finally:
        restore()


def few_shot(
    model: nn.Module,
    policy: MaskPolicy,
    target_test: Mapping[str, LanguageData],
    pools: Mapping[str, LanguageData],
    batcher: Batcher,
    tokenizer,
    settings: Any,
    evaluator: Evaluator,
    *,
    seed: int,
    clip_norm: float | None = None,
    predictions: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The few-shot protocol on the target languages (``settings``: ``fewshot.*``), the same for
    every method and task.

    For each target language of ``target_test`` (its whole test split) and repetition ``r``
    (seed ``1000 * seed + r``): draw ``k`` support examples from its pool in ``pools``
    ([draw_support][subnets.data.support.draw_support], [support_pool][subnets.data.support.support_pool]),
    fine-tune ``model`` on them for ``steps`` steps with a fresh optimizer and ``policy``'s test-time
    adaptation (forward gates and/or update mask), score the test set without the support examples
    (``evaluator``: the task's metrics), and restore ``model`` in place to the weights it came
    with (what a copy per repetition would give, without the copies; ``model`` is left as it
    was). Returns per language the runs and the mean and standard deviation (ddof 1) of each
    metric; the predictions of repetition 0 go to ``<predictions>/<code>-test.<format>``.
    """
    out: dict[str, Any] = {"k": settings.k, "steps": settings.steps, "repetitions": settings.repetitions,
                           "optimizer": setting(settings.optimizer), "lr_encoder": settings.lr_encoder,
                           "lr_head": settings.lr_head, "languages": {}}  # fmt: skip
    if settings.repetitions <= 0:
        return out
    metrics = evaluator.task.metrics
    device = torch.device(batcher.device)
    progress = bar(len(target_test) * settings.repetitions, "few-shot", "repetition")
    with restored(model) as restore:
        for code, test in target_test.items():
            runs, started = [], time.perf_counter()
            for repetition in range(settings.repetitions):
                draw_seed = 1000 * seed + repetition
                support, rest = draw_support(pools[code], test, settings.k, draw_seed)
                if support.pieces is None:
                    support.tokenize(tokenizer)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(draw_seed)
                    gates, update_mask = policy.adaptation(model, code, support)
                    fine_tune(model, batcher.micro_batches(support, settings.max_tokens), settings.steps, settings.lr_encoder, settings.lr_head,
                              settings.weight_decay, clip_norm, gates, update_mask, setting(settings.optimizer))  # fmt: skip
                path = (
                    Path(predictions) / f"{code}-test{evaluator.task.prediction_suffix}"
                    if predictions is not None and not repetition
                    else None
                )
                scores = evaluator.score(model, rest, gates, path)
                runs.append({"seed": draw_seed, "support_split": support.split, **scores})
                restore()
                progress.update(1)
            summary = {"runs": runs, "support_split": runs[0]["support_split"]}
            for key in metrics:
                values = np.array([run[key] for run in runs])
                summary[f"{key}_mean"] = float(values.mean())
                summary[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out["languages"][code] = summary
            log.info("few-shot, %s: %s over %d repetitions (k=%d from %s, %d steps; %.1f s)", code,
                     " ".join(f"{key.upper()} {summary[f'{key}_mean']:.2f} +- {summary[f'{key}_sd']:.2f}" for key in metrics),
                     settings.repetitions, settings.k, summary["support_split"], settings.steps,
                     time.perf_counter() - started)  # fmt: skip
    progress.close()
    languages = out["languages"].values()
    out["mean"] = {key: float(np.mean([s[f"{key}_mean"] for s in languages])) for key in metrics}
    return out
