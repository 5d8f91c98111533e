"""Gradient conflict: cosine similarity between the gradients that different languages send to
the shared parameters (Yu et al. 2020, "Gradient surgery"; Wang et al. 2020). A negative cosine
means a step of one language undoes part of another's; subnetworks should make such pairs rarer."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.data.batching import Batch
from subnets.files import read_jsonl


def shared_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters every language shares and updates: all trainable ones except the embedding
    layer's (its table rows are mostly touched by one language's own tokens)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and "embeddings." not in n]


def language_gradients(
    model: nn.Module,
    batches: Mapping[str, Batch],
    *,
    gates: Callable[[str], torch.Tensor | None] = lambda lang: None,
    update_mask: Callable[[str], Mapping[str, torch.Tensor] | None] = lambda lang: None,
    parameters: list[tuple[str, nn.Parameter]] | None = None,
) -> dict[str, torch.Tensor]:
    """Each language's loss gradient on its batch, as one flat vector over ``parameters``
    (default [shared_parameters][subnets.analysis.conflict.shared_parameters]), in eval mode (no dropout).

    ``gates(lang)`` are the head gates of its forward pass and ``update_mask(lang)`` (parameter
    name -> 0/1 tensor) the coordinates its update may change: the gradient a method would apply.
    The model's ``.grad`` fields are left empty and its train/eval mode as it was.
    """
    parameters = shared_parameters(model) if parameters is None else parameters
    was_training = model.training
    model.eval()
    out = {}
    try:
        for lang, batch in batches.items():
            model.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]), model.gates.applied(gates(lang)):
                model(batch).loss.backward()
            mask = update_mask(lang) or {}
            pieces = []
            for name, p in parameters:
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                if name in mask:
                    grad = grad * mask[name]
                pieces.append(grad.detach().reshape(-1).float().cpu())
            out[lang] = torch.cat(pieces)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


def cosine_matrix(gradients: Mapping[str, torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """Languages and the matrix of cosine similarities between their gradient vectors (a zero
    vector has cosine 0 with everything)."""
    languages = list(gradients)
    stacked = torch.stack([gradients[lang].double() for lang in languages])
    norms = stacked.norm(dim=1)
    dots = stacked @ stacked.T
    denominator = norms[:, None] * norms[None, :]
    cosines = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))
    return languages, cosines.numpy()


def negative_share(matrix: np.ndarray) -> float:
    """Share of the distinct language pairs (above the diagonal) whose cosine is negative."""
    upper = np.asarray(matrix)[np.triu_indices(len(matrix), k=1)]
    return float((upper < 0).mean()) if upper.size else float("nan")


def conflict_matrix(
    model: nn.Module,
    batches: Mapping[str, Batch],
    **kwargs: Any,
) -> dict[str, Any]:
    """[language_gradients][subnets.analysis.conflict.language_gradients], then
    [cosine_matrix][subnets.analysis.conflict.cosine_matrix] and
    [negative_share][subnets.analysis.conflict.negative_share], as a record
    ``{"languages", "cosine", "negative_share", "mean_cosine"}``."""
    languages, matrix = cosine_matrix(language_gradients(model, batches, **kwargs))
    upper = matrix[np.triu_indices(len(matrix), k=1)]
    return {
        "languages": languages,
        "cosine": matrix.tolist(),
        "negative_share": negative_share(matrix),
        "mean_cosine": float(upper.mean()) if upper.size else float("nan"),
    }


def probe_batches(data: Mapping[str, Any], batcher: Any, size: int, seed: int, step: int) -> dict[str, Batch]:
    """Each language's fixed batch for a measurement at ``step``: ``size`` sentences of its
    [LanguageData][subnets.data.dataset.LanguageData], drawn by a generator seeded with the run's
    ``seed``, the step and the language (so measuring consumes no training randomness)."""
    batches = {}
    for lang, language in data.items():
        rng = random.Random(f"{seed}/conflict/{step}/{lang}")
        batches[lang] = batcher.of(
            language, sorted(rng.sample(range(len(language)), min(size, len(language))))
        )
    return batches


def load_conflict(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The measurements a run wrote to ``analysis/gradient_conflict.jsonl`` (``analysis.conflict_every``),
    one per step in step order (a step measured twice, by a resumed run, counts once)."""
    path = Path(run_dir) / "analysis" / "gradient_conflict.jsonl"
    if not path.exists():
        return []
    by_step = {record["step"]: record for record in read_jsonl(path)}
    return [by_step[step] for step in sorted(by_step)]
