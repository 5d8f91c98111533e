"""Static subnetworks: each source language's mask searched once (before training, or after
``masks.after_steps`` steps of multilingual training), or loaded from a saved set, and kept."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from torch import nn

from subnets.config import setting
from subnets.data.dataset import Batcher
from subnets.files import atomic_write_json
from subnets.masks.activation import language_neurons
from subnets.masks.controls import split_half_agreement
from subnets.masks.search import find_subnetwork, matching_parameters
from subnets.masks.subnetwork import SubnetworkSet
from subnets.methods.base import Outputs, SourceLanguages
from subnets.methods.subnetworks import RandomControl, SubnetworkPolicy
from subnets.progress import bar
from subnets.runs.checkpoint import phase_rng
from subnets.training.update import StepResult

log = logging.getLogger(__name__)


def static_masks(model: nn.Module, search: Any, sources: SourceLanguages, batcher: Batcher,
                 outputs: Outputs) -> SubnetworkSet:  # fmt: skip
    """The static procedure's masks: loaded from ``masks.path`` or the run's cached
    ``masks/masks.safetensors``, else found by [search_masks][subnets.methods.static.search_masks]."""
    cached = outputs.folder / "masks" / "masks.safetensors"
    path = search.path or (cached if cached.exists() else None)
    if path:
        log.info("loading subnetworks from %s", path)
        return SubnetworkSet.load(path, expect=model)
    return search_masks(model, search, sources, batcher, outputs)


def search_masks(model: nn.Module, search: Any, sources: SourceLanguages, batcher: Batcher,
                 outputs: Outputs) -> SubnetworkSet:  # fmt: skip
    """Find every source language's subnetwork: optionally fine-tune a copy on the language
    (``masks.finetune_steps``), score heads (``masks.importance``), select a mask
    (``masks.selection``; iterative pruning uses the language's dev split). Activation scores
    (``masks.importance=activation``, [subnets.masks.activation][]) compare the languages: every
    language is measured first, on the model itself.

    Each language's search draws its random numbers (the fine-tuned copy's dropout) from
    generators seeded by the run's seed and the language (``phase_rng``),
    and leaves the global ones as it found them: a run that computes its masks, one that loads
    them (``masks.path``) and one that resumes continue with the same random numbers."""
    masks = SubnetworkSet.for_model(model)
    fisher_params = setting(search.params) == "fisher"
    param_names = matching_parameters(model, search.param_include) if fisher_params else []
    needs_samples = setting(search.importance) == "fisher" or param_names
    iterative = setting(search.selection) == "iterative"
    history, reliability = {}, {}
    neurons = None
    if setting(search.importance) == "activation":  # the languages are compared: all measured first
        with phase_rng(batcher.seed, "masks/activation", batcher.device):
            neurons = language_neurons(model, {lang: batcher.fixed(data, search.batch_size, search.importance_batches,
                                                                   "importance") for lang, data in sources.train.items()},
                                       search.activation_quantile, split_half=True)  # fmt: skip
        if search.finetune_steps:
            log.info("masks.importance=activation measures the model as it is: masks.finetune_steps=%d is not used",
                     search.finetune_steps)  # fmt: skip
    progress = bar(len(sources.train), "mask search", "language")
    for lang, data in sources.train.items():
        started = time.perf_counter()
        dev = sources.dev.get(lang)
        if iterative and dev is None:
            raise ValueError(f"masks.selection=iterative needs a dev split for training language {lang}; "
                             "use masks.selection=keep_ratio or top_k")  # fmt: skip

        def dev_metric(scorer, mask, dev=dev):
            return sources.dev_metric(scorer, dev, mask.float().to(batcher.device))

        with phase_rng(batcher.seed, f"masks/{lang}", batcher.device):
            found = find_subnetwork(
                model,
                batcher.fixed(data, search.batch_size, search.importance_batches, "importance"),
                importance=setting(search.importance),
                selection=setting(search.selection),
                dev_metric=dev_metric,
                keep_ratio=search.keep_ratio,
                top_k=search.top_k,
                prune_fraction=search.prune_fraction,
                threshold=search.threshold,
                min_heads_per_layer=search.min_heads_per_layer,
                samples=batcher.fixed(data, 1, search.param_samples, "fisher") if needs_samples else None,
                finetune_batches=batcher.fixed(data, sources.batch_size, 8, "finetune"),
                finetune_steps=search.finetune_steps,
                make_optimizer=sources.make_optimizer,
                param_names=param_names,
                param_keep_ratio=search.param_keep_ratio,
                param_scope=setting(search.param_scope),
                split_half=True,
                scores=None if neurons is None else neurons.scores[lang],
                score_halves=None if neurons is None else neurons.halves.get(lang),
            )
        found.subnetwork.scores = found.importance
        masks[lang] = found.subnetwork
        if found.pruning is not None:
            history[lang] = {"baseline": found.pruning.baseline, "rounds": found.pruning.history,
                             "stopped_by": found.pruning.stopped_by}  # fmt: skip
        kept, total = found.subnetwork.num_units_kept, found.subnetwork.unit_mask.numel()
        agreement = ""
        if found.halves is not None:
            reliability[lang] = split_half_agreement(found.halves, found.subnetwork.unit_mask, masks.units)
            # with fewer sentences than the importance batches hold, the halves share sentences
            reliability[lang]["disjoint"] = len(data) >= search.batch_size * search.importance_batches
            agreement = (f"; split-half Jaccard {reliability[lang]['jaccard']:.2f} (chance "
                         f"{reliability[lang]['random_jaccard']:.2f}), Spearman {reliability[lang]['spearman']:.2f}")  # fmt: skip
        log.info("mask search, %s: kept %d of %d units%s (%.1f s)", lang, kept, total, agreement,
                 time.perf_counter() - started)  # fmt: skip
        progress.update(1)
    progress.close()
    if reliability:
        atomic_write_json(outputs.folder / "masks" / "reliability.json", reliability)
    if history:
        atomic_write_json(outputs.folder / "masks" / "pruning.json", history)
        log.debug("pruning history: %s", json.dumps(history))
    return masks


class StaticMasks(SubnetworkPolicy):
    """Per-language masks computed once and kept (``+method=static``):
    [search_masks][subnets.methods.static.search_masks], or a saved set (``masks.path``). The masks are cached
    in ``<run>/masks/masks.safetensors``.

    They are searched before training, or with ``masks.after_steps=S`` on the shared model after
    S steps of multilingual training in which every language uses and updates every head (the
    search then runs at step S, inside training); the remaining steps are masked."""

    uses_masks_path = True
    uses_after_steps = True

    def __init__(self, search: Any, apply: str = "gradient", control: RandomControl | None = None):
        super().__init__(search, apply, control)
        self._pending: tuple | None = None  # (model, sources, outputs) of a search still to come

    def prepare(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        if self.masks is None and self.search.after_steps > 0:
            self._pending = (model, sources, outputs)
            return
        if self.masks is None:
            self.find_masks(model, sources, outputs)
        self.check_languages(sources.train)

    def after_step(self, step: int, result: StepResult) -> dict[str, float]:
        if self._pending is not None and step >= self.search.after_steps:
            model, sources, outputs = self._pending
            self._pending = None
            log.info("searching the subnetworks after %d steps of multilingual training", step)
            self.find_masks(model, sources, outputs)
            self.check_languages(sources.train)
        return {}

    def find_masks(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        """Set the masks ([static_masks][subnets.methods.static.static_masks], through the control if there is
        one; a cached ``masks.safetensors`` holds the control's masks, whose counts are the static ones, so
        drawing again from them gives the same masks) and write their summary, with the
        search's reliability for the masks it found itself."""
        self.set_masks(self.found(static_masks(model, self.search, sources, self.batcher, outputs)))
        reliability = outputs.folder / "masks" / "reliability.json"  # written by search_masks
        own = self.control is None and reliability.exists()
        self.write_summary(outputs, {"reliability": json.loads(reliability.read_text())} if own else None)


def random_masks(search: Any, apply: str = "gradient") -> StaticMasks:
    """The random-mask control of static masks (``+method=random``, ``maml_random``): the static
    procedure ([static_masks][subnets.methods.static.static_masks]: the search of ``masks.*``, or the set at
    ``masks.path``; at step ``masks.after_steps`` if set) with its masks turned into random ones of the same
    counts, fixed for the run ([RandomControl][subnets.methods.subnetworks.RandomControl])."""
    return StaticMasks(search, apply, control=RandomControl())
