"""Prediction and scoring of a parser on one language."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from subnets.data.batching import Collator
from subnets.data.dataset import LanguageData
from subnets.data.treebank import write_conllu
from subnets.metrics import attachment_scores
from subnets.models.parser import DependencyParser, Prediction
from subnets.progress import bar


def predict(
    model: DependencyParser,
    data: LanguageData,
    collator: Collator,
    batch_size: int = 128,
    gates: torch.Tensor | None = None,
) -> list[Prediction]:
    """Predictions for every sentence of ``data`` in order, under head ``gates`` if given.

    Sentences are batched by length for speed; the model is left in the mode it was in.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: sum(len(p) for p in data.pieces[i]))
    predictions: list[Prediction | None] = [None] * len(data)
    was_training = model.training
    model.eval()
    progress = bar(-(-len(order) // batch_size), f"evaluate {data.code}-{data.split}", "batch")
    try:
        with model.gates.applied(gates):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = collator(
                    [data.sentences[i] for i in chunk], [data.pieces[i] for i in chunk], data.code
                )
                for i, prediction in zip(chunk, model.predict(batch.to(device))):
                    predictions[i] = prediction
                progress.update(1)
    finally:
        progress.close()
        model.train(was_training)
    return predictions


def evaluate(
    model: DependencyParser,
    data: LanguageData,
    collator: Collator,
    batch_size: int = 128,
    gates: torch.Tensor | None = None,
    predictions_path: str | os.PathLike | None = None,
) -> dict[str, float]:
    """UAS/LAS (and UPOS) of ``model`` on ``data``; with ``predictions_path``, writes the
    predictions as CoNLL-U and, beside them (``<name>.gold.conllu``), the gold sentences scored,
    so that the official scorer compares the two files directly (also when ``data`` is a capped
    split or one without its support sentences).

    The prediction file holds the predicted HEAD and DEPREL (parsing) and UPOS (tagging) and
    ``_`` in the LEMMA, XPOS, FEATS and DEPS columns, which no task predicts, and in UPOS for
    a parser without a tagger. A tagger without a parser keeps the gold HEAD and DEPREL: the
    format and the scorer need a tree, so the scorer's UAS/LAS of such a file mean nothing.
    """
    predictions = predict(model, data, collator, batch_size, gates)
    heads = [p.heads for p in predictions] if model.parsing else None
    deprels = [p.deprels for p in predictions] if model.parsing else None
    upos = [p.upos for p in predictions] if model.tagging else None
    if predictions_path is not None:
        path = Path(predictions_path)
        write_conllu(
            path, data.sentences, heads, deprels, upos, blank=(2, 4, 5, 8) if upos else (2, 3, 4, 5, 8)
        )
        write_conllu(gold_path(path), data.sentences)
    return attachment_scores(data.sentences, heads, deprels, upos)


def gold_path(predictions_path: str | os.PathLike) -> Path:
    """Where :func:`evaluate` writes the gold sentences of a predictions file."""
    path = Path(predictions_path)
    return path.with_name(path.name.removesuffix(".conllu") + ".gold.conllu")
