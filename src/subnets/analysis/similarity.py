"""Representation similarity between languages: linear CKA (Kornblith et al. 2019) of the
encoder's word representations, averaged per sentence, over parallel sentences (the same
``sent_id`` in several treebanks, as in the PUD treebanks)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.data.batching import Collator
from subnets.data.dataset import LanguageData


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations of the same ``n`` examples (``[n, d1]``, ``[n, d2]``):
    ``||Y'^T X'||_F^2 / (||X'^T X'||_F ||Y'^T Y'||_F)`` with column-centred ``X'``, ``Y'``.
    1 for representations equal up to rotation and isotropic scaling, near 0 for unrelated ones."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} and {y.shape[0]} examples; both need the same examples")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denominator) if denominator > 0 else float("nan")


@torch.no_grad()
def sentence_representations(
    model: nn.Module,
    data: LanguageData,
    collator: Collator,
    batch_size: int = 32,
    gates: torch.Tensor | None = None,
    sent_ids: set[str] | None = None,
) -> dict[str, np.ndarray]:
    """``sent_id`` -> the model's representation of that example
    ([sentence_representations][subnets.models.heads.TaskModel.sentence_representations]: for word-level tasks
    the mean of the scalar-mixed word vectors the head reads), in eval mode. ``sent_ids`` restricts
    it to those examples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen = [i for i, s in enumerate(data.examples) if sent_ids is None or s.sent_id in sent_ids]
    out: dict[str, np.ndarray] = {}
    try:
        for start in range(0, len(chosen), batch_size):
            indices = chosen[start : start + batch_size]
            batch = collator(
                [data.examples[i] for i in indices], [data.pieces[i] for i in indices], data.code
            )
            batch = batch.to(device)
            with model.gates.applied(gates):
                means = model.sentence_representations(batch)
            for i, vector in zip(indices, means.float().cpu().numpy()):
                out[data.examples[i].sent_id] = vector
    finally:
        model.train(was_training)
    return out


def parallel_sentence_ids(
    datasets: Mapping[str, LanguageData], limit: int | None = None
) -> tuple[list[str], list[str]]:
    """The largest group of languages whose data share sentence ids, and up to ``limit`` ids
    they all have (in the first language's order). ([], []) when no two languages share one."""
    ids = {lang: [s.sent_id for s in data.examples] for lang, data in datasets.items()}
    best: tuple[list[str], list[str]] = ([], [])
    for own in ids.values():
        group = [other for other in ids if set(ids[other]) & set(own)]
        common = set.intersection(*(set(ids[other]) for other in group))
        shared = [i for i in own if i in common]
        if len(group) >= 2 and shared and (len(group), len(shared)) > (len(best[0]), len(best[1])):
            best = (group, shared)
    languages, shared = best
    return languages, shared if limit is None else shared[:limit]


def cka_matrix(
    representations: Mapping[str, Mapping[str, np.ndarray]], sent_ids: list[str]
) -> tuple[list[str], np.ndarray]:
    """Languages and the matrix of linear CKA between their representations of ``sent_ids``."""
    if not sent_ids:
        raise ValueError("cka_matrix: no sentence ids given; CKA needs the same sentences in every language")
    languages = list(representations)
    stacked = {lang: np.stack([representations[lang][i] for i in sent_ids]) for lang in languages}
    matrix = np.ones((len(languages), len(languages)))
    for a, first in enumerate(languages):
        for b in range(a + 1, len(languages)):
            matrix[a, b] = matrix[b, a] = linear_cka(stacked[first], stacked[languages[b]])
    return languages, matrix


def cka_record(
    model: nn.Module,
    datasets: Mapping[str, Any],
    collator: Any,
    batch_size: int,
    sentences: int,
    gates: Callable[[str], torch.Tensor | None] = lambda lang: None,
) -> dict[str, Any] | None:
    """Linear CKA between the languages of ``datasets`` that share sentence ids (the largest such
    group, up to ``sentences`` sentences:
    [parallel_sentence_ids][subnets.analysis.similarity.parallel_sentence_ids]), each language's
    representations taken under ``gates(lang)``: ``{"languages", "sentences", "matrix"}``, or None when no two
    languages share sentences."""
    languages, ids = parallel_sentence_ids(datasets, sentences)
    if not languages:
        return None
    representations = {lang: sentence_representations(model, datasets[lang], collator, batch_size, gates(lang), set(ids))
                       for lang in languages}  # fmt: skip
    languages, matrix = cka_matrix(representations, ids)
    return {"languages": languages, "sentences": len(ids), "matrix": matrix.tolist()}


def load_cka(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"before": record, "after": record}`` from a run's ``analysis/cka_{before,after}.json``
    (``analysis.cka_sentences``); each record holds ``languages``, ``sentences`` and ``matrix``."""
    folder = Path(run_dir) / "analysis"
    return {
        when: json.loads((folder / f"cka_{when}.json").read_text())
        for when in ("before", "after")
        if (folder / f"cka_{when}.json").exists()
    }
