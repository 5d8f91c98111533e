"""Finding each language's subnetwork of a [SubnetworkModel][subnets.hf.SubnetworkModel] from its data and
the model's own loss: [find_subnetworks][subnets.hf.find.find_subnetworks]."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from subnets.hf.model import SubnetworkModel
from subnets.masks.activation import language_neurons
from subnets.masks.core import random_subnetwork
from subnets.masks.importance import fisher_information, fisher_per_unit, unit_importance
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet


def find_subnetworks(
    model: SubnetworkModel,
    data: Mapping[str, Any],
    *,
    batch_size: int = 8,
    collate_fn: Callable[[list], Any] | None = None,
    max_batches: int | None = None,
    max_samples: int = 64,
) -> SubnetworkSet:
    """Each language's subnetwork, from its data and the model's own loss (``model(**batch).loss``),
    selected by ``model.subnetwork_config``; set on the model and returned.

    Args:
        data: language -> a ``datasets.Dataset`` (or list of examples) with the model's input
            columns and labels, or an iterable of ready batches (a ``DataLoader``).
        batch_size: examples per batch for a dataset.
        collate_fn: turns a list of examples into a batch (default: transformers'
            ``default_data_collator``; pass your ``Trainer``'s collator for padding).
        max_batches: batches scored per language (default: all).
        max_samples: single examples per language for ``importance='fisher'``.

    With ``importance='activation'`` every language is measured first, in one forward pass per
    batch without labels or gradients ([language_neurons][subnets.masks.activation.language_neurons]):
    a language's neurons are the most language-specific among those it activates often.
    """
    config = model.subnetwork_config
    found = SubnetworkSet(model.gates.num_layers, model.gates.units)
    if config.importance == "activation" and config.rule != "random":  # the languages are compared
        batches = {code: _batches(model, code, source, batch_size, collate_fn)[:max_batches] for code, source in data.items()}  # fmt: skip
        measured = language_neurons(model.model, batches, config.activation_quantile, gates=model.gates,
                                    run=lambda batch: model.model(**batch))  # fmt: skip
        for code, scores in measured.scores.items():
            found[code] = Subnetwork(config.select(scores, model.gates.units), scores=scores)
    for code, source in data.items():
        if code in found:
            continue
        if config.rule == "random":
            # the same share of units in every layer, drawn uniformly by the seed and the language
            share = (
                config.keep_ratio
                if config.top_k is None
                else config.top_k / model.gates.shape[0] / model.gates.shape[1]
            )
            found[code] = random_subnetwork(
                torch.full(model.gates.shape, share), code, config.seed, model.gates.units
            )
            continue
        if config.importance == "head":
            batches = _batches(model, code, source, batch_size, collate_fn)
            scores = unit_importance(
                model, batches, model.task_loss, gates=model.gates, max_batches=max_batches
            )
        else:
            samples = _batches(model, code, source, 1, collate_fn)
            owned = {id(p) for p in model.gates.owned_parameters()}
            names = [n for n, p in model.named_parameters() if id(p) in owned and p.requires_grad]
            fisher = fisher_information(
                model, samples, model.task_loss, parameters=names, max_batches=max_samples
            )
            scores = fisher_per_unit(fisher, model, model.gates)
            scores = scores / scores.max() if scores.max() > 0 else scores
        found[code] = Subnetwork(config.select(scores, model.gates.units), scores=scores)
    merged = SubnetworkSet(model.gates.num_layers, model.gates.units)
    for code in model.masks:
        merged[code] = model.masks[code]
    for code in found:
        merged[code] = found[code]
    model.set_masks(merged)
    return found


def _batches(model: SubnetworkModel, code: str, source: Any, batch_size: int, collate_fn) -> list:
    """Batches of language ``code``: a dataset or list of examples is cut into batches (the language
    column and columns the model does not take are left out); anything else is taken as batches."""
    try:
        import datasets

        is_dataset = isinstance(source, (datasets.Dataset, list))
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_dataset = isinstance(source, list)
    if not is_dataset:
        batches = list(source)
        if not batches:
            raise ValueError(f"find_subnetworks: language {code!r} has no batches (its data loader is empty)")
        return batches
    if collate_fn is None:
        from transformers import default_data_collator as collate_fn
    examples = [{k: v for k, v in dict(example).items() if k in model._forward_names} for example in source]
    if not examples:
        raise ValueError(f"find_subnetworks: language {code!r} has no examples")
    return [collate_fn(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
