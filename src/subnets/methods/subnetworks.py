"""Subnetwork policies: what a language's masks decide, however they were found.

A step of language ``l`` runs and updates through ``l``'s subnetwork according to ``apply``:

* ``forward``: units outside the subnetwork are gated off (gate 0) in the forward pass; the
  update is the optimizer's ordinary step (their gradients are zero, but weight decay and
  momentum may still move them);
* ``gradient``: the full model runs; the update is exact-masked
  ([MaskedOptimizer][subnets.optim.masked.MaskedOptimizer]): nothing outside the subnetwork moves;
* ``both``: gated forward and exact-masked update.

A subnetwork is made of attention heads, feed-forward neurons or both (``masks.units``: the
model's gates decide); parameters no unit owns (embeddings, LayerNorm, the task heads, and the
feed-forward block unless neurons are units) are shared by all languages unless unstructured
parameter masks cover them.

Unseen (development and target) languages get a subnetwork by ``masks.target_policy``:
``full`` (no mask), ``support`` (units selected from importance on the language's k support
examples, keeping the source languages' mean share of each kind of unit) or ``nearest`` (the
mask of the source language whose importance scores have the highest cosine similarity with the
support-estimated scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from subnets.config import SettingError, setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.files import atomic_write_json
from subnets.masks import core
from subnets.masks.compact import subnetwork_parameters, train_subnetworks_only
from subnets.masks.controls import random_jaccard_matrix
from subnets.masks.importance import unit_importance
from subnets.masks.selection import per_kind, select_keep_ratio, select_top_k
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet, unit_parameter_masks
from subnets.methods.base import MaskPolicy, Outputs
from subnets.optim.masked import MaskedOptimizer


class RandomControl:
    """The random-mask control as a transform of any mask source: each language's mask becomes a
    random one with, in every layer, as many units (of each kind) as it had, and as many
    coordinates per parameter mask, drawn uniformly from a generator seeded by the run seed and
    the language ([random_control][subnets.masks.core.random_control]); an unseen language gets, under a
    test-time policy other than ``full``, a random mask with the source masks' mean per-layer
    counts: no importance reaches a control. Drawing again from random masks gives the same
    masks (only the counts, the seed and the language matter)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, masks: SubnetworkSet) -> SubnetworkSet:
        return core.random_control(masks, self.seed)

    def unseen(self, masks: SubnetworkSet, code: str) -> Subnetwork:
        mean = torch.stack([s.unit_mask.float() for s in masks.values()]).mean(dim=0)
        return core.random_subnetwork(mean, code, self.seed, masks.units)


class SubnetworkPolicy(MaskPolicy):
    """What a subnetwork policy decides, from its source languages' masks (``masks``): a step of
    language ``l`` runs with ``l``'s gates and updates ``l``'s parameters as ``apply`` says, and
    an unseen language gets a mask by the test-time policy (``masks.target_policy``). Where the
    masks come from is the rest: a subclass sets them ([StaticMasks][subnets.methods.StaticMasks]
    searches them once, [DynamicMasks][subnets.methods.DynamicMasks] re-selects them as it trains),
    and ``control`` ([RandomControl][subnets.methods.subnetworks.RandomControl]) turns whatever masks a source
    finds into random masks of the same counts.

    Args:
        search: the ``masks.*`` settings (``MasksConfig``).
        apply: ``forward``, ``gradient`` or ``both`` (module docstring).
        control: a transform of the masks found ([found][subnets.methods.subnetworks.SubnetworkPolicy.found]),
            e.g. [RandomControl][subnets.methods.subnetworks.RandomControl]; its ``seed`` is set to the run's
            when the policy is bound.
    """

    has_subnetworks = True
    supports_sharding = True

    def __init__(self, search: Any, apply: str = "gradient", control: RandomControl | None = None):
        self.search, self.control = search, control
        self.mode = str(setting(apply))
        self.masks: SubnetworkSet | None = None
        self.target_masks: dict[str, Subnetwork] = {}
        self.nearest: dict[str, str] = {}
        self.model: nn.Module | None = None
        self.batcher: Batcher | None = None
        self._update_masks: dict[str, dict[str, torch.Tensor] | None] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def needs_support(self) -> bool:
        return setting(self.search.target_policy) != "full"

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        self.model, self.batcher = model, batcher
        if self.control is not None:
            self.control.seed = batcher.seed
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
        self.optimizer = MaskedOptimizer(optimizer, model.named_parameters())
        return self.optimizer

    def settings(self) -> dict[str, Any]:
        """These subnetworks' settings by the names [SubnetworkConfig][subnets.hf.SubnetworkConfig] shares
        with ``masks.*`` and ``method.apply`` (what ``subnets-export`` records with the set)."""
        names = ("units", "keep_ratio", "top_k", "min_heads_per_layer", "importance", "target_policy",
                 "activation_quantile")  # fmt: skip
        out = {name: setting(getattr(self.search, name)) for name in names}
        out |= {"apply": self.mode, "rule": "static" if self.control is None else "random"}
        return out if self.control is None else {**out, "seed": self.control.seed}

    def subnetwork(self, lang: str) -> Subnetwork | None:
        """The subnetwork of a training language, or of an unseen one under the test-time policy."""
        if self.masks is not None and lang in self.masks:
            return self.masks[lang]
        return self.target_masks.get(lang)

    def gates_of(self, subnetwork: Subnetwork | None) -> torch.Tensor | None:
        gates = core.gate_values(subnetwork, self.mode)
        return None if gates is None else gates.to(self._device())

    def update_mask_of(self, subnetwork: Subnetwork | None) -> dict[str, torch.Tensor] | None:
        return core.update_mask(self.model, subnetwork, self.mode)

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
        """Use ``masks`` from now on; with ``masks.train=subnetwork``, train their union alone
        ([train_subnetworks_only][subnets.masks.compact.train_subnetworks_only], in the optimizer
        built before: a new selection keeps the moments of the rows it keeps)."""
        self.masks = masks
        self._update_masks.clear()
        if (
            setting(getattr(self.search, "train", "all")) == "subnetwork"
            and len(masks)
            and self.model is not None
        ):
            train_subnetworks_only(self.model, masks.values(), self.model.encoder.transformer, self.optimizer)

    def found(self, masks: SubnetworkSet) -> SubnetworkSet:
        """The masks a source found, through the ``control`` transform if there is one."""
        return masks if self.control is None else self.control(masks)

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
        if policy == "full" or self.masks is None:  # no test-time mask, or none searched yet (after_steps)
            return None
        if self.control is not None:
            return self.control.unseen(self.masks, code)
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
        """The masks and, with ``masks.train=subnetwork`` on a half-precision base, the subnetworks' fp32
        master values (the model's dense weights hold them rounded)."""
        state = {"masks": None if self.masks is None else self.masks.state_dict()}
        values = subnetwork_parameters(self.model) if self.model is not None else None
        if values is not None and any(p.values.dtype != p.module.weight.dtype for p in values.projections):
            state["values"] = {name: v.detach().clone() for name, v in values.named_parameters()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("masks") is not None:
            shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()} if self.model else None
            self.set_masks(SubnetworkSet.from_state_dict(state["masks"], shapes))
        if state.get("values"):
            with torch.no_grad():
                for name, value in subnetwork_parameters(self.model).named_parameters():
                    value.copy_(state["values"][name])


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


def subnetwork_budget(model: nn.Module, search: Any) -> int:
    """The parameters a static subnetwork of the ``masks.*`` settings (``search``) lets a language
    update inside the gated units: those its kept heads or neurons own (parameters no unit owns,
    shared by every language, are not counted). With ``masks.train=subnetwork`` (``search.train``)
    only the weights its units own count, as only they train
    ([train_subnetworks_only][subnets.masks.compact.train_subnetworks_only]: biases stay frozen).
    The count is the same for every choice of units when units of a kind are equal in size, as in
    every supported model; the first units are taken. ``lora.match=static``, ``shira.match=static``
    and ``sft.match=static`` size LoRA, SHiRA and LT-SFT by it.

    Raises:
        SettingError: a selection whose size depends on the data (``masks.selection=iterative``)
            or unstructured parameter masks (``masks.params``).
    """
    selection = setting(search.selection)
    if selection == "iterative" or setting(search.params) != "none":
        raise SettingError(f"a budget matched to a static subnetwork (lora.match / shira.match / sft.match=static) needs a size known "
                           f"before training: masks.selection=keep_ratio or top_k (is {selection}) and masks.params=none "
                           f"(is {setting(search.params)})")  # fmt: skip
    gates = model.gates
    scores = torch.zeros(gates.num_layers, sum(gates.units.values()))
    if selection == "top_k":
        mask = select_top_k(scores, int(search.top_k), search.min_heads_per_layer, gates.units)
    else:
        mask = select_keep_ratio(scores, float(search.keep_ratio), search.min_heads_per_layer, gates.units)
    masks = unit_parameter_masks(model, mask)
    if setting(getattr(search, "train", "all")) == "subnetwork":  # the projection weights alone
        weights = {id(getattr(m, "weight", None)) for m in model.modules()}
        named = dict(model.named_parameters())
        masks = {name: kept for name, kept in masks.items() if id(named[name]) in weights}
    return sum(int(kept.sum()) for kept in masks.values())
