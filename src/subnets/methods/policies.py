"""Mask policies with language-specific subnetworks: static and dynamic.

A step of language ``l`` runs and updates through ``l``'s subnetwork according to ``apply``:

* ``forward``: units outside the subnetwork are gated off (gate 0) in the forward pass; the
  update is the optimizer's ordinary step (their gradients are zero, but weight decay and
  momentum may still move them);
* ``gradient``: the full model runs; the update is exact-masked (:class:`MaskedOptimizer`):
  nothing outside the subnetwork moves;
* ``both``: gated forward and exact-masked update.

A subnetwork is made of attention heads, feed-forward neurons or both (``masks.units``: the
model's gates decide); parameters no unit owns (embeddings, LayerNorm, the task heads, and the
feed-forward block unless neurons are units) are shared by all
languages unless unstructured parameter masks cover them.

Unseen (development and target) languages get a subnetwork by ``masks.target_policy``:
``full`` (no mask), ``support`` (units selected from importance on the language's k support
sentences, keeping the source languages' mean share of each kind of unit) or ``nearest`` (the mask of the
source language whose importance scores have the highest cosine similarity with the
support-estimated scores).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.checkpoint import phase_rng
from subnets.config import SettingError, setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.files import atomic_write_json
from subnets.masks.controls import (
    generator,
    random_jaccard_matrix,
    random_like,
    random_mask_like,
    split_half_agreement,
)
from subnets.masks.dynamic import HardConcreteGates, ImportanceEMA, reselect
from subnets.masks.figures import history_figure
from subnets.masks.importance import unit_importance
from subnets.masks.search import find_subnetwork, matching_parameters
from subnets.masks.selection import Units, per_kind, select_keep_ratio
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet, unit_parameter_masks
from subnets.methods.base import MaskPolicy, Outputs, SourceLanguages
from subnets.optim.masked import MaskedOptimizer, UpdateMask
from subnets.progress import bar
from subnets.update import StepResult

log = logging.getLogger(__name__)


class SubnetworkPolicy(MaskPolicy):
    """What every subnetwork policy shares: the source languages' masks (``masks``), how they
    are applied (``apply``), the test-time policy for unseen languages, the mask outputs and
    state. Subclasses decide where the masks come from and how they change.

    Args:
        search: the ``masks.*`` settings (:class:`~subnets.config.MasksConfig`).
        apply: ``forward``, ``gradient`` or ``both`` (module docstring).
    """

    def __init__(self, search: Any, apply: str = "gradient"):
        self.search = search
        self.mode = str(setting(apply))
        self.masks: SubnetworkSet | None = None
        self.target_masks: dict[str, Subnetwork] = {}
        self.nearest: dict[str, str] = {}
        self.model: nn.Module | None = None
        self.batcher: Batcher | None = None
        self._update_masks: dict[str, dict[str, torch.Tensor] | None] = {}

    @property
    def needs_support(self) -> bool:
        return setting(self.search.target_policy) != "full"

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        self.model, self.batcher = model, batcher
        layers, units = model.gates.num_layers, model.gates.units
        minimum, top_k = self.search.min_heads_per_layer, self.search.top_k
        fewest = min(units, key=units.get)
        if minimum > units[fewest]:
            raise SettingError(
                f"masks.min_heads_per_layer={minimum}: the model has {units[fewest]} {fewest} per layer"
            )
        if top_k is not None and len(units) > 1:
            raise SettingError(f"masks.top_k={top_k}: a number of units cannot be shared between {' and '.join(units)} "
                               "(masks.units=both); use masks.selection=keep_ratio")  # fmt: skip
        count = sum(units.values())
        if top_k is not None and not layers * minimum <= top_k <= layers * count:
            raise SettingError(f"masks.top_k={top_k}: expected between {layers * minimum} (masks.min_heads_per_layer "
                               f"x {layers} layers) and {layers * count} (every unit)")  # fmt: skip

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return MaskedOptimizer(optimizer, model.named_parameters())

    def subnetwork(self, lang: str) -> Subnetwork | None:
        """The subnetwork of a training language, or of an unseen one under the test-time policy."""
        if self.masks is not None and lang in self.masks:
            return self.masks[lang]
        return self.target_masks.get(lang)

    def gates_of(self, subnetwork: Subnetwork | None) -> torch.Tensor | None:
        if subnetwork is None or self.mode == "gradient":
            return None
        return subnetwork.unit_mask.float().to(self._device())

    def update_mask_of(self, subnetwork: Subnetwork | None) -> dict[str, torch.Tensor] | None:
        if subnetwork is None or self.mode == "forward":
            return None
        masks = unit_parameter_masks(self.model, subnetwork.unit_mask.to(self._device()))
        for name, mask in subnetwork.param_masks.items():
            masks[name] = mask.to(self._device())
        return UpdateMask(masks)  # planned once by the masked optimizer

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def gates(self, lang: str) -> torch.Tensor | None:
        return self.gates_of(self.subnetwork(lang))

    def update_mask(self, lang: str) -> dict[str, torch.Tensor] | None:
        if lang not in self._update_masks:
            self._update_masks[lang] = self.update_mask_of(self.subnetwork(lang))
        return self._update_masks[lang]

    def eval_gates(self, lang: str) -> torch.Tensor | None:
        return self.gates_of(self.subnetwork(lang))

    def set_masks(self, masks: SubnetworkSet) -> None:
        self.masks = masks
        self._update_masks.clear()

    def check_languages(self, languages) -> None:
        missing = [lang for lang in languages if lang not in self.masks]
        if missing:
            raise ValueError(f"the mask set has no subnetwork for training language(s) {', '.join(missing)} "
                             f"(it has: {', '.join(self.masks)}); set masks.path to a set that covers them")  # fmt: skip

    # ---------------------------------------------------------------- unseen languages
    def prepare_evaluation(self, model: nn.Module, support: Mapping[str, LanguageData]) -> None:
        """Subnetworks of the development and target languages by the test-time policy, from
        their support sentences and the current model."""
        self.target_masks.clear()
        self._update_masks = {k: v for k, v in self._update_masks.items() if k in (self.masks or {})}
        for code, data in support.items():
            subnetwork = self.policy_subnetwork(model, code, data)
            if subnetwork is not None:
                self.target_masks[code] = subnetwork

    def policy_subnetwork(self, model: nn.Module, code: str, support: LanguageData) -> Subnetwork | None:
        """The subnetwork of unseen language ``code`` by ``masks.target_policy`` (module docstring)."""
        policy = setting(self.search.target_policy)
        if policy == "full":
            return None
        size = self.search.batch_size
        scores = unit_importance(
            model, self.batcher.fixed(support, size, max(1, -(-len(support) // size)), "support")
        )
        if policy == "support":  # the source masks' mean share of each kind of unit

            def select(block: torch.Tensor, columns: slice) -> torch.Tensor:
                keep = float(np.mean([s.unit_mask[:, columns].float().mean() for s in self.masks.values()]))
                return select_keep_ratio(block, keep, self.search.min_heads_per_layer)

            return Subnetwork(per_kind(select, scores, self.masks.units), scores=scores)
        similarity = {
            source: float(torch.nn.functional.cosine_similarity(scores.flatten(), s.scores.flatten(), dim=0))
            for source, s in self.masks.items()
            if s.scores is not None
        }
        if not similarity:
            raise ValueError("target_policy=nearest needs the source masks' importance scores")
        source = max(similarity, key=similarity.get)
        self.nearest[code] = source
        chosen = self.masks[source]
        return Subnetwork(chosen.unit_mask, chosen.param_masks, scores)

    def adaptation(self, model: nn.Module, lang: str, support: LanguageData):
        subnetwork = self.policy_subnetwork(model, lang, support)
        return self.gates_of(subnetwork), self.update_mask_of(subnetwork)

    # ---------------------------------------------------------------- outputs and state
    def write_summary(self, outputs: Outputs, extra: Mapping[str, Any] | None = None) -> None:
        """Masks, sparsity, overlap matrix (and its chance level), ``extra`` entries and the
        heatmap into ``<run>/masks/``; with several kinds of unit, the same per kind
        (``by_unit`` in summary.json, ``overlap_<kind>.png``); logged to W&B."""
        import matplotlib.pyplot as plt

        folder = outputs.folder / "masks"
        folder.mkdir(parents=True, exist_ok=True)
        self.masks.save(folder / "masks.safetensors")
        summary = {"units": self.masks.units, **_overlap_summary(self.masks), **(extra or {})}
        figures = {"overlap": self.masks.overlap_figure()}
        if len(self.masks.units) > 1:
            summary["by_unit"] = {kind: _overlap_summary(self.masks.kind(kind)) for kind in self.masks.units}
            figures.update(
                {f"overlap_{kind}": self.masks.kind(kind).overlap_figure() for kind in self.masks.units}
            )
        atomic_write_json(folder / "summary.json", summary)
        for name, figure in figures.items():
            figure.savefig(folder / f"{name}.png", dpi=120)
        outputs.log({f"masks/{lang}/sparsity": s["sparsity"] for lang, s in summary["sparsity"].items()},
                    images={f"masks/{name}": figure for name, figure in figures.items()})  # fmt: skip
        for figure in figures.values():
            plt.close(figure)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.masks is not None:
            out["sparsity"] = {lang: s.sparsity() for lang, s in self.masks.items()}
        if self.target_masks:
            out["target_sparsity"] = {lang: s.sparsity() for lang, s in self.target_masks.items()}
        if self.nearest:
            out["nearest"] = dict(self.nearest)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"masks": None if self.masks is None else self.masks.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("masks") is not None:
            shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()} if self.model else None
            self.set_masks(SubnetworkSet.from_state_dict(state["masks"], shapes))


def _overlap_summary(masks: SubnetworkSet) -> dict[str, Any]:
    """Sparsity per language, the Jaccard overlap matrix, and its chance level: the expected
    Jaccard of independent random masks with each pair's per-layer counts."""
    languages, overlap = masks.jaccard()
    _, chance = random_jaccard_matrix(masks)
    return {
        "sparsity": masks.sparsity(),
        "jaccard": {"languages": languages, "matrix": overlap.tolist()},
        "random_jaccard": {"languages": languages, "matrix": chance.tolist()},
    }


def static_masks(model: nn.Module, search: Any, sources: SourceLanguages, batcher: Batcher,
                 outputs: Outputs) -> SubnetworkSet:  # fmt: skip
    """The static procedure's masks: loaded from ``masks.path`` or the run's cached
    ``masks/masks.safetensors``, else found by :func:`search_masks`."""
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
    (``masks.selection``; iterative pruning uses the language's dev split).

    Each language's search draws its random numbers (the fine-tuned copy's dropout) from
    generators seeded by the run's seed and the language (:func:`~subnets.checkpoint.phase_rng`),
    and leaves the global ones as it found them: a run that computes its masks, one that loads
    them (``masks.path``) and one that resumes continue with the same random numbers."""
    masks = SubnetworkSet.for_model(model)
    fisher_params = setting(search.params) == "fisher"
    param_names = matching_parameters(model, search.param_include) if fisher_params else []
    needs_samples = setting(search.importance) == "fisher" or param_names
    iterative = setting(search.selection) == "iterative"
    history, reliability = {}, {}
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
    """Per-language masks computed once and kept (``+method=static``): :func:`search_masks`, or
    a saved set (``masks.path``). The masks are cached in ``<run>/masks/masks.safetensors``.

    They are searched before training, or with ``masks.after_steps=S`` on the shared model after
    S steps of multilingual training in which every language uses and updates every head (the
    search then runs at step S, inside training); the remaining steps are masked."""

    uses_masks_path = True
    uses_after_steps = True

    def __init__(self, search: Any, apply: str = "gradient"):
        super().__init__(search, apply)
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
        """Set the masks (:func:`static_masks`) and write their summary with its reliability."""
        self.set_masks(static_masks(model, self.search, sources, self.batcher, outputs))
        reliability = outputs.folder / "masks" / "reliability.json"  # written by search_masks
        extra = {"reliability": json.loads(reliability.read_text())} if reliability.exists() else {}
        self.write_summary(outputs, extra)

    def policy_subnetwork(self, model: nn.Module, code: str, support: LanguageData) -> Subnetwork | None:
        if self.masks is None:  # masks.after_steps: not searched yet
            return None
        return super().policy_subnetwork(model, code, support)


class RandomMasks(StaticMasks):
    """Random-mask control (``+method=random``, ``maml_random``): each language's mask keeps in
    every layer as many units (of each kind) as its static mask (:func:`static_masks`: the search of
    ``masks.*``, or the set at ``masks.path``; at step ``masks.after_steps`` if set), and
    parameter masks as many coordinates per tensor, drawn uniformly from a generator seeded by
    the run seed and the language (:func:`~subnets.masks.controls.random_like`); fixed for the
    run. An unseen language gets, under ``masks.target_policy`` other than ``full``, a random mask
    with the source masks' mean per-layer counts: no importance reaches a control."""

    def find_masks(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        # A cached masks.safetensors holds this policy's random masks: their counts are the
        # static ones, so drawing again from them gives the same masks.
        self.set_masks(random_like(static_masks(model, self.search, sources, self.batcher, outputs),
                                   self.batcher.seed))  # fmt: skip
        self.write_summary(outputs)

    def policy_subnetwork(self, model: nn.Module, code: str, support: LanguageData) -> Subnetwork | None:
        if self.masks is None or setting(self.search.target_policy) == "full":
            return None
        mean = torch.stack([s.unit_mask.float() for s in self.masks.values()]).mean(dim=0)
        rng = generator(self.batcher.seed, f"random/{code}")
        return Subnetwork(random_mask_like(mean, rng, self.masks.units))


class ScoreRule:
    """A dynamic rule that re-selects each language's mask from per-head scores with the
    configured selection (``dynamic.selection`` with ``masks.keep_ratio``, ``top_k``, ...).
    Its hooks do nothing; :class:`EMARule` and :class:`RandomRule` say where the scores come from."""

    track_gates = False
    supports_episodes = True

    def __init__(self, search: Any, dynamic: Any):
        self.search, self.dynamic = search, dynamic
        self.units: Units | None = None

    def bind(self, languages: list[str], shape: tuple[int, int], device: torch.device, seed: int = 0,
             units: Units | None = None) -> None:  # fmt: skip
        self.units = units

    def start_from(self, masks: SubnetworkSet) -> None:
        pass

    def gates(self, lang: str, mask_gates: torch.Tensor | None) -> torch.Tensor | None:
        return mask_gates

    def extra_loss(self, lang: str):
        return None

    def parameters(self) -> list[torch.Tensor]:
        return []

    def observe(self, result: StepResult) -> dict[str, float]:
        return {}

    def select(self, scores: torch.Tensor, current: Subnetwork) -> torch.Tensor:
        """The mask the configured selection keeps from ``scores``."""
        search = self.search
        return reselect(scores, current.unit_mask, setting(self.dynamic.selection), search.keep_ratio,
                        search.top_k, self.dynamic.score_threshold, search.min_heads_per_layer, self.units)  # fmt: skip


class EMARule(ScoreRule):
    """Dynamic rule ``ema``: each language's importance is the moving average of ``|dL/dgate|``
    of its own training steps (the gates carry gradients in every step: no extra pass); its mask
    is re-selected from it (``dynamic.selection``)."""

    track_gates = True

    def __init__(self, search: Any, dynamic: Any):
        super().__init__(search, dynamic)
        self.ema: ImportanceEMA | None = None

    def bind(self, languages: list[str], shape: tuple[int, int], device: torch.device, seed: int = 0,
             units: Units | None = None) -> None:  # fmt: skip
        super().bind(languages, shape, device, seed, units)
        self.ema = ImportanceEMA(shape, self.dynamic.decay, units)

    def observe(self, result: StepResult) -> dict[str, float]:
        for lang, gate_grad in result.gate_grads.items():
            self.ema.update(lang, gate_grad)
        return {}

    def reselect(self, lang: str, current: Subnetwork) -> tuple[torch.Tensor, torch.Tensor | None]:
        if lang not in self.ema.averages:  # no step of this language yet
            return current.unit_mask, current.scores
        scores = self.ema.scores(lang)
        return self.select(scores, current), scores

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])


class LearnedRule:
    """Dynamic rule ``learned``: per-language hard-concrete gate logits trained with the model,
    with a penalty pulling the expected share of open gates to ``masks.keep_ratio``; the
    training forward pass uses the sampled gates, the mask the deterministic ones
    (:class:`~subnets.masks.dynamic.HardConcreteGates`)."""

    track_gates = False
    supports_episodes = False  # its penalty and gate optimizer belong to a single-batch step

    def __init__(self, search: Any, dynamic: Any):
        self.search, self.dynamic = search, dynamic
        self.learned: HardConcreteGates | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def bind(self, languages: list[str], shape: tuple[int, int], device: torch.device, seed: int = 0,
             units: Units | None = None) -> None:  # fmt: skip
        self.units = units
        self.learned = HardConcreteGates(languages, shape, beta=self.dynamic.temperature).to(device)
        self.optimizer = torch.optim.Adam(self.learned.parameters(), lr=self.dynamic.gate_lr)

    def start_from(self, masks: SubnetworkSet) -> None:
        with torch.no_grad():  # start the logits at the given masks
            for lang, subnetwork in masks.items():
                self.learned.log_alpha[lang].copy_(subnetwork.unit_mask.float() * 4 - 2)

    def gates(self, lang: str, mask_gates: torch.Tensor | None) -> torch.Tensor:
        return self.learned.sample(lang)

    def extra_loss(self, lang: str):
        weight, target = self.dynamic.sparsity_weight, self.search.keep_ratio
        return lambda: weight * self.learned.sparsity_penalty(lang, target)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.learned.parameters())

    def observe(self, result: StepResult) -> dict[str, float]:
        if not result.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "masks/open_probability": float(self.learned.open_probability(result.language).detach().mean())
        }

    def reselect(self, lang: str, current: Subnetwork) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.learned.mask(
            lang, self.search.min_heads_per_layer, self.units
        ), self.learned.open_probability(lang).detach()

    def state_dict(self) -> dict[str, Any]:
        return {"learned": self.learned.state_dict(), "gate_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.learned.load_state_dict(state["learned"])
        self.optimizer.load_state_dict(state["gate_optimizer"])


class RandomRule(ScoreRule):
    """Dynamic rule ``random``, a control: at every update each language's mask is redrawn, the
    configured selection applied to uniform random scores instead of importance; the scores come
    from a generator seeded by the run seed, the language and the update's number
    (:mod:`subnets.masks.controls`)."""

    def __init__(self, search: Any, dynamic: Any):
        super().__init__(search, dynamic)
        self.updates: dict[str, int] = {}

    def bind(self, languages: list[str], shape: tuple[int, int], device: torch.device, seed: int = 0,
             units: Units | None = None) -> None:  # fmt: skip
        super().bind(languages, shape, device, seed, units)
        self.shape, self.seed = tuple(shape), seed

    def reselect(self, lang: str, current: Subnetwork) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.updates[lang] = self.updates.get(lang, 0) + 1
        rng = generator(self.seed, f"random/{lang}/{self.updates[lang]}")
        scores = torch.from_numpy(rng.random(self.shape)).float()
        return self.select(scores, current), scores

    def state_dict(self) -> dict[str, Any]:
        return {"random_updates": dict(self.updates)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = dict(state["random_updates"])


RULES = {"ema": EMARule, "learned": LearnedRule, "random": RandomRule}


class DynamicMasks(SubnetworkPolicy):
    """Masks updated jointly with the model (``+method=dynamic``).

    Initial masks keep every head (``dynamic.init=full``) or come from the static procedure
    (``static``). Every ``dynamic.update_every`` steps each language's mask is re-selected by
    the rule (``dynamic.rule``: :class:`EMARule`, :class:`LearnedRule`, the control
    :class:`RandomRule`, or any object with their methods passed as ``rule``; its ``bind``
    receives the languages, the gate shape, the device, ``seed=``, the run seed, and ``units=``,
    the kinds of unit in the gate columns). A coordinate that re-enters a language's subnetwork
    continues from the optimizer state it had when it left (:class:`MaskedOptimizer`: frozen,
    not advanced). The mask after every update and the number of units that changed are kept
    per language and written, with figures, to ``<run>/masks/`` at the end of training.

    Args:
        search: the ``masks.*`` settings; dynamic: the ``dynamic.*`` settings; apply: as for
        static masks; rule: a rule object (default: ``RULES[dynamic.rule]``).
    """

    def __init__(self, search: Any, dynamic: Any, apply: str = "gradient", rule: Any = None):
        super().__init__(search, apply)
        self.dynamic = dynamic
        name = setting(dynamic.rule)
        if rule is None and name not in RULES:
            raise ValueError(f"dynamic.rule: unknown rule {name!r}; available: {', '.join(RULES)}")
        self.rule = rule if rule is not None else RULES[name](search, dynamic)
        self.supports_episodes = self.rule.supports_episodes
        self.uses_masks_path = setting(dynamic.init) == "static"
        self.history: dict[str, list[dict[str, Any]]] = {}

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        super().bind(model, batcher, languages)
        self.rule.bind(
            list(languages), model.gates.shape, batcher.device, seed=batcher.seed, units=model.gates.units
        )

    def prepare(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        if self.masks is not None:  # restored from a checkpoint
            return
        if setting(self.dynamic.init) == "static":
            self.set_masks(static_masks(model, self.search, sources, self.batcher, outputs))
            self.write_summary(outputs)
            self.check_languages(sources.train)
            self.rule.start_from(self.masks)
        else:
            masks = SubnetworkSet.for_model(model)
            for lang in sources.train:
                masks[lang] = Subnetwork(torch.ones(model.gates.shape, dtype=torch.bool))
            self.set_masks(masks)
        self._record(0, {lang: 0 for lang in self.masks})

    # ---------------------------------------------------------------- training
    def gates(self, lang: str) -> torch.Tensor | None:
        return self.rule.gates(lang, super().gates(lang))

    def track_gates(self, lang: str) -> bool:
        return self.rule.track_gates

    def extra_loss(self, lang: str):
        return self.rule.extra_loss(lang)

    def extra_parameters(self) -> list[torch.Tensor]:
        return self.rule.parameters()

    def after_step(self, step: int, result: StepResult) -> dict[str, float]:
        logs = self.rule.observe(result)
        if step % self.dynamic.update_every == 0:
            changed = self.update_masks(step)
            logs["masks/units_changed"] = float(sum(changed.values()))
            logs.update({f"masks/{lang}/sparsity": self.masks[lang].sparsity() for lang in self.masks})
        return logs

    def update_masks(self, step: int) -> dict[str, int]:
        """Re-select every language's mask; returns the number of units that changed per language."""
        masks, changed = SubnetworkSet.for_model(self.model), {}
        for lang, current in self.masks.items():
            mask, scores = self.rule.reselect(lang, current)
            masks[lang] = Subnetwork(mask, current.param_masks, scores)
            changed[lang] = int((mask != current.unit_mask).sum())
        self.set_masks(masks)
        self._record(step, changed)
        return changed

    def _record(self, step: int, changed: dict[str, int]) -> None:
        for lang, subnetwork in self.masks.items():
            self.history.setdefault(lang, []).append({
                "step": step, "changed": changed.get(lang, 0), "sparsity": subnetwork.sparsity(),
                "mask": subnetwork.unit_mask.int().tolist(),
            })  # fmt: skip

    # ---------------------------------------------------------------- outputs and state
    def on_train_end(self, outputs: Outputs) -> None:
        """Write the final masks, overlap heatmap, and the mask history with its figure."""
        self.write_summary(outputs)
        folder = outputs.folder / "masks"
        atomic_write_json(folder / "history.json", self.history)
        figure = history_figure(self.history)
        figure.savefig(folder / "history.png", dpi=120)
        outputs.log({}, images={"masks/history": figure})
        import matplotlib.pyplot as plt

        plt.close(figure)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["mask_changes"] = {
            lang: sum(h["changed"] for h in entries) for lang, entries in self.history.items()
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.rule.state_dict(), "history": self.history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rule.load_state_dict(state)
        self.history = {lang: [dict(h) for h in entries] for lang, entries in state["history"].items()}
