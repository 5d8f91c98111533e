"""Language neurons compared and tested: how far two selections of feed-forward neurons agree
([selection_overlap][subnets.analysis.neurons.selection_overlap]), e.g. the gradient-selected
(``masks.importance=head``, [subnets.masks.importance][]) and the activation-selected
(``masks.importance=activation``, [subnets.masks.activation][]) neurons of the same languages,
and what zeroing one language's neurons does to every language's perplexity
([deactivation_table][subnets.analysis.neurons.deactivation_table]): the deactivation table of
LAPE (Tang et al. 2024, "Language-Specific Neurons: The Key to Multilingual Capabilities in
Large Language Models").

Overlap is the Jaccard index ``|A & B| / |A | B|`` of a language's two masks, against its chance
level: the exact expected Jaccard of two independent random masks with the same number of units
in every layer ([chance_jaccard][subnets.masks.controls.chance_jaccard], from the layers'
hypergeometric overlaps). A ratio near 1 means the two selections share no more neurons than
random ones would.

Deactivation zeroes language A's neurons through the gates (gate 0 on them, 1 on every other
unit) and measures language B's metric (default: masked-LM perplexity,
[perplexity][subnets.analysis.neurons.perplexity]) against the ungated model. Neurons specific to
their language raise its own perplexity (the diagonal) more than the others' (off the
diagonal); the table reports the two means either way.

Example (a masked-LM run whose masks are neurons; [load_run][subnets.runs.trained.load_run])::

    trained = load_run("outputs/mlm_activation")
    data = {lang: trained.data(f"data/{lang}/test.txt", lang, "test") for lang in trained.languages}
    batches = {lang: trained.batcher.fixed(d, 16, 4, "deactivation") for lang, d in data.items()}
    table = deactivation_table(trained.model, batches, trained.method.policy.masks)
    table["change"], table["diagonal"], table["off_diagonal"]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.masks.controls import chance_jaccard, jaccard
from subnets.masks.subnetwork import MaskMismatchError, Subnetwork, SubnetworkSet
from subnets.models.gates import UnitGates
from subnets.models.lm import LanguageModel

Metric = Callable[[nn.Module, Sequence], float]  # (model, one language's batches) -> a number


def _restricted(masks: SubnetworkSet, units: str | None, which: str) -> SubnetworkSet:
    if units is None:
        return masks
    if units not in masks.units:
        raise MaskMismatchError(f"the {which} selection has no {units} (its units: {', '.join(masks.units)})")
    return masks.kind(units)


def selection_overlap(
    first: SubnetworkSet, second: SubnetworkSet, units: str | None = "neurons"
) -> dict[str, Any]:
    """Per language, the Jaccard overlap of two selections of units, its chance level and their ratio.

    Args:
        first: one selection (e.g. a gradient-selected run's ``masks/masks.safetensors``).
        second: the other (e.g. an activation-selected run's), for a model of the same geometry.
        units: the kind of unit compared (``neurons``, ``heads``; each set restricted to it,
            [SubnetworkSet.kind][subnets.masks.subnetwork.SubnetworkSet.kind]), or None for
            every unit of the sets (which must then have the same kinds).

    Returns:
        ``{"units", "languages", "per_language", "mean", "only_first", "only_second"}``:
        ``per_language[lang]`` holds ``jaccard`` (``|A & B| / |A | B|``; 1 for two empty masks),
        ``chance`` (the expected Jaccard of two independent uniformly random masks with the
        same count in every layer and kind,
        [chance_jaccard][subnets.masks.controls.chance_jaccard]), ``ratio`` (``jaccard / chance``;
        NaN where the chance is 0, i.e. one mask is empty), and the counts ``first``, ``second``
        and ``shared``; ``mean`` the mean over the languages of ``jaccard``, ``chance`` and
        ``ratio`` (the mean of the ratios, NaN if one is); ``languages`` those both sets hold (in the first's
        order), ``only_first`` and ``only_second`` the others.

    Raises:
        MaskMismatchError: the sets describe models of different geometry, or one lacks ``units``.
        ValueError: the sets share no language.
    """
    a, b = _restricted(first, units, "first"), _restricted(second, units, "second")
    a.check_compatible(b, "the first selection")
    languages = [lang for lang in a if lang in b]
    if not languages:
        raise ValueError(f"the selections share no language (first: {', '.join(a) or 'none'}; "
                         f"second: {', '.join(b) or 'none'})")  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    for lang in languages:
        x, y = a[lang].unit_mask, b[lang].unit_mask
        overlap, chance = jaccard(x, y), chance_jaccard(x, y, a.units)
        rows[lang] = {"jaccard": overlap, "chance": chance, "ratio": overlap / chance if chance > 0 else math.nan,
                      "first": int(x.sum()), "second": int(y.sum()), "shared": int((x & y).sum())}  # fmt: skip
    mean = {
        key: float(np.mean([rows[lang][key] for lang in languages])) for key in ("jaccard", "chance", "ratio")
    }
    return {
        "units": units if units is not None else "+".join(a.units),
        "languages": languages,
        "per_language": rows,
        "mean": mean,
        "only_first": [lang for lang in a if lang not in b],
        "only_second": [lang for lang in b if lang not in a],
    }


def _exp(value: float) -> float:
    return math.exp(value) if value < 709.0 else math.inf


def perplexity(model: nn.Module, batches: Sequence) -> float:
    """The default metric of [deactivation_table][subnets.analysis.neurons.deactivation_table]: the
    exp of the mean token loss of ``batches``, as the task reports it. For a ``LanguageModel``
    (the model of ``task=mlm`` or ``clm``, [subnets.tasks.lm][]): the summed
    negative log-likelihood of every predicted token over their number, from its ``predict``
    (the perplexity an evaluation reports, [LanguageModelling][subnets.tasks.lm.LanguageModelling]);
    for another model, the mean of ``model(batch).loss`` weighted by each batch's ``num_words``
    (its loss is a mean over them), or by batch where a batch has none. Runs as called: in
    the caller's mode, gates and gradient setting."""
    if isinstance(model, LanguageModel):
        nll, tokens = 0.0, 0
        for batch in batches:
            for summed, count, _ in model.predict(batch):
                nll, tokens = nll + summed, tokens + count
        return _exp(nll / tokens) if tokens else math.nan
    total, weight = 0.0, 0.0
    for batch in batches:
        words = float(getattr(batch, "num_words", 1))
        total, weight = total + float(model(batch).loss) * words, weight + words
    return _exp(total / weight) if weight else math.nan


def _batch_list(batches: Any) -> list:
    """One language's batches as a list: a list or tuple of batches, an iterator of them, or one batch."""
    if isinstance(batches, (list, tuple)):
        return list(batches)
    return list(batches) if isinstance(batches, Iterator) else [batches]


def _neuron_masks(neurons: Mapping[str, Any] | SubnetworkSet, gates: UnitGates) -> dict[str, torch.Tensor]:
    """Language -> boolean ``[layers, neurons]`` (True: zeroed) from a set, or from masks or
    subnetworks of the neurons (or of every unit the gates cover: their neuron columns)."""
    if isinstance(neurons, SubnetworkSet):
        if "neurons" not in neurons.units:
            raise MaskMismatchError(
                f"these masks select {' and '.join(neurons.units)}, no feed-forward neurons"
            )
        if len(neurons.units) > 1:
            neurons = neurons.kind("neurons")
    shape = (gates.num_layers, gates.units["neurons"])
    masks = {}
    for lang, mask in neurons.items():
        mask = mask.unit_mask if isinstance(mask, Subnetwork) else torch.as_tensor(mask)
        if tuple(mask.shape) == tuple(gates.shape) and len(gates.units) > 1:
            mask = mask[:, gates.columns["neurons"]]
        if tuple(mask.shape) != shape:
            raise MaskMismatchError(f"{lang}: a neuron mask of shape {tuple(mask.shape)} for a model with "
                                    f"(layers, neurons) = {shape}")  # fmt: skip
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{lang}: pass masks (True or 1 on the neurons to zero), not scores; select them "
                             "first, e.g. subnets.masks.selection.select_keep_ratio(scores, 0.01)")  # fmt: skip
        masks[lang] = mask.detach().bool().cpu()
    return masks


def deactivation_table(
    model: nn.Module,
    batches_by_language: Mapping[str, Any],
    neurons_by_language: Mapping[str, Any] | SubnetworkSet,
    metric: Metric | None = None,
    *,
    gates: UnitGates | None = None,
) -> dict[str, Any]:
    """LAPE's deactivation table: for each pair (deactivated language A, evaluated language B),
    the change of B's metric when A's neurons are zeroed, against the ungated model.

    A's neurons are zeroed through the gates (values 0 on them, 1 on every other unit the gates
    cover, heads included); the ungated model is measured with no gates at all. Everything runs
    in eval mode without gradient, on a fork of the CPU random state; the model's mode, its
    gates' values and the CPU random state are restored, also when the metric raises.

    Args:
        model: the model (e.g. [TrainedRun.model][subnets.runs.trained.TrainedRun]).
        batches_by_language: language B -> its batches (a list or tuple, an iterator, or one
            batch), each evaluated once per row and once ungated.
        neurons_by_language: language A -> the neurons to zero: a
            [SubnetworkSet][subnets.masks.subnetwork.SubnetworkSet] with neurons (its neuron
            columns are used), or masks ``[layers, neurons]`` (boolean, or 0/1; or of every unit
            the gates cover, whose neuron columns are used) or
            [Subnetwork][subnets.masks.subnetwork.Subnetwork] objects.
        metric: ``metric(model, batches) -> float`` for one language's batches (default:
            [perplexity][subnets.analysis.neurons.perplexity]); an HF model that takes keyword
            input needs its own, e.g. ``lambda m, bs: math.exp(sum(m(**b).loss for b in bs) / len(bs))``.
        gates: the model's [UnitGates][subnets.models.gates.UnitGates] (default: ``model.gates``);
            they must cover neurons.

    Returns:
        ``{"deactivated", "evaluated", "baseline", "metric", "change", "neurons", "diagonal",
        "off_diagonal"}``: ``deactivated`` the languages A (rows, in the order of
        ``neurons_by_language``), ``evaluated`` the languages B (columns, in the order of
        ``batches_by_language``), ``baseline`` B -> the ungated metric, ``metric[a][b]`` the
        metric with A's neurons zeroed and ``change[a][b]`` that minus B's baseline (lists of
        lists), ``neurons`` A -> the number of neurons zeroed, ``diagonal`` the mean change
        where A is B and ``off_diagonal`` where A is not B (NaN where there is no such pair).

    Raises:
        ValueError: gates without neurons, or scores given for masks.
        MaskMismatchError: a mask whose shape is not the model's ``[layers, neurons]``.
    """
    gates = gates if gates is not None else model.gates
    if "neurons" not in gates.units:
        raise ValueError(f"deactivation zeroes feed-forward neurons; these gates cover {' and '.join(gates.units)} "
                         "(gate units='neurons' or 'both')")  # fmt: skip
    metric = metric or perplexity
    masks = _neuron_masks(neurons_by_language, gates)
    batches = {lang: _batch_list(b) for lang, b in batches_by_language.items()}
    deactivated, evaluated = list(masks), list(batches)
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            with gates.applied(None):
                baseline = {lang: float(metric(model, batches[lang])) for lang in evaluated}
            measured = []
            for lang in deactivated:
                values = torch.ones(gates.shape)
                values[:, gates.columns["neurons"]] = (~masks[lang]).float()
                with gates.applied(values.to(device)):
                    measured.append([float(metric(model, batches[other])) for other in evaluated])
    finally:
        model.train(was_training)
    table = np.array(measured, dtype=np.float64).reshape(len(deactivated), len(evaluated))
    change = table - np.array([baseline[lang] for lang in evaluated])[None, :]
    same = np.array([[a == b for b in evaluated] for a in deactivated], dtype=bool).reshape(change.shape)
    return {
        "deactivated": deactivated,
        "evaluated": evaluated,
        "baseline": baseline,
        "metric": table.tolist(),
        "change": change.tolist(),
        "neurons": {lang: int(mask.sum()) for lang, mask in masks.items()},
        "diagonal": float(change[same].mean()) if same.any() else math.nan,
        "off_diagonal": float(change[~same].mean()) if (~same).any() else math.nan,
    }
