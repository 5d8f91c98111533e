"""Adapter baselines through peft: one LoRA for all languages (``+method=lora``), one per source
language (``+method=language_lora``, as MAD-X's language adapters, with LoRA modules), and SHiRA
(``+method=shira``).

The encoder is wrapped by ``peft.get_peft_model`` when the policy is bound (before the optimizer
is built and before a checkpoint is loaded, so parameter names are the same in training,
resumes, evaluation and ``load_run``): its weights are frozen, the LoRA matrices of the target
projections (``lora.targets``, by default the layout's query, key, value and attention output
projections) and the task head train.

``+method=shira`` ([ShiraPolicy][subnets.methods.adapters.ShiraPolicy]) trains SHiRA's sparse
high-rank adapters the same way: a fixed random set of coordinates of the same projections.

``language_lora`` adds one adapter per source language (peft's multi-adapter API) and activates a
step's language's adapter (``set_adapter``): only that adapter (and the shared task head) gets
gradients, so the others are untouched by the step. An unseen language gets, by
``lora.target_policy``, no adapter (``full``), the typologically nearest source language's
(``nearest``, URIEL syntax features) or the one with the lowest loss on its support sentences
(``support``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from subnets.config import SettingError, setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.methods.base import MaskPolicy
from subnets.methods.subnetworks import subnetwork_budget

log = logging.getLogger(__name__)


def lora_targets(model: nn.Module, settings: Any, name: str = "lora") -> str:
    """peft's ``target_modules``: a regular expression matching the target projections of every
    layer of ``model.encoder.transformer``, from ``<name>.targets`` (``lora.targets``,
    ``shira.targets``) or the layout.

    Raises:
        SettingError: a target that no layer of the transformer has.
    """
    layout = model.gates.layout.attention
    paths = list(settings.targets) or [
        p for p in (layout.query, layout.key, layout.value, layout.qkv, layout.output) if p
    ]
    transformer = model.encoder.transformer
    names = {name for name, _ in transformer.named_modules()}
    pattern = rf"{re.escape(layout.layers)}\.\d+\.({'|'.join(re.escape(p) for p in paths)})"
    missing = [
        p
        for p in paths
        if not any(re.fullmatch(rf"{re.escape(layout.layers)}\.\d+\.{re.escape(p)}", n) for n in names)
    ]
    if missing:
        raise SettingError(f"{name}.targets: {', '.join(missing)} is not a projection of the layers at "
                           f"{layout.layers} (the layout's are {layout.query}, {layout.key}, {layout.value}, "
                           f"{layout.output}; a layer holds e.g. {', '.join(sorted(_layer_children(names, layout.layers))[:6])})")  # fmt: skip
    return pattern


def lora_parameters_per_rank(model: nn.Module, settings: Any, name: str = "lora") -> int:
    """The parameters one LoRA adds per unit of rank: ``in + out`` features of every target
    projection (its ``A`` is ``rank x in``, its ``B`` ``out x rank``); SHiRA's per unit of ``r``
    too (``r x (in + out)`` coordinates of each target)."""
    pattern = re.compile(lora_targets(model, settings, name))
    return sum(sum(module.weight.shape) for path, module in model.encoder.transformer.named_modules()
               if pattern.fullmatch(path))  # fmt: skip


def _layer_children(names: set[str], layers: str) -> set[str]:
    prefix = re.compile(rf"{re.escape(layers)}\.0\.(.+)")
    return {m.group(1) for m in map(prefix.fullmatch, names) if m}


class LoraPolicy(MaskPolicy):
    """One LoRA for every language (``+method=lora``): module docstring."""

    supports_episodes = (
        False  # peft's frozen base and the functional inner loop of MAML are not combined here
    )

    def __init__(self, lora: Any, search: Any = None):
        self.lora, self.search = lora, search  # search: the masks.* settings (lora.match=static)
        self.model: nn.Module | None = None
        self.rank = int(lora.rank)
        self.matched: int | None = None  # the static subnetwork's budget the rank was chosen for

    @property
    def matches_static_budget(self) -> bool:
        """Whether the rank is sized to a static subnetwork's budget (``lora.match=static``; with
        ``masks.train=subnetwork``, the subnetwork-only one)."""
        return setting(self.lora.match) == "static"

    def match_rank(self, model: nn.Module, settings: Any, name: str) -> None:
        """Under ``<name>.match=static``, the rank (SHiRA's ``r``) whose parameters come closest to
        [subnetwork_budget][subnets.methods.subnetworks.subnetwork_budget] (once: a resume keeps it)."""
        if self.matches_static_budget and self.matched is None:
            self.matched = subnetwork_budget(model, self.search)
            per_rank = lora_parameters_per_rank(model, settings, name)
            self.rank = max(1, round(self.matched / per_rank))
            log.info("%s.match=static: rank %d (%d parameters per adapter) for a static subnetwork's %d",
                     name, self.rank, self.rank * per_rank, self.matched)  # fmt: skip

    def config(self, model: nn.Module):
        from peft import LoraConfig

        self.match_rank(model, self.lora, "lora")
        return LoraConfig(r=self.rank, lora_alpha=float(self.lora.alpha), lora_dropout=float(self.lora.dropout),
                          target_modules=lora_targets(model, self.lora), bias="none")  # fmt: skip

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        from peft import PeftModel, get_peft_model

        self.model = model
        if not isinstance(model.encoder.transformer, PeftModel):
            model.encoder.transformer = get_peft_model(model.encoder.transformer, self.config(model))

    def summary(self) -> dict[str, Any]:
        matched = {} if self.matched is None else {"matched_budget": self.matched}
        return {"lora": {"rank": self.rank, "alpha": float(self.lora.alpha), **matched}}


class LanguageLora(LoraPolicy):
    """One LoRA per source language (``+method=language_lora``): module docstring."""

    supports_mixed_batches = False  # a step activates one language's adapter

    def __init__(self, lora: Any, search: Any = None):
        super().__init__(lora, search)
        self.languages: list[str] = []
        self.target_adapters: dict[str, str | None] = {}
        self.batcher: Batcher | None = None

    @property
    def needs_support(self) -> bool:
        return setting(self.lora.target_policy) == "support"

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        from peft import PeftModel, get_peft_model

        self.model, self.batcher, self.languages = model, batcher, list(languages)
        transformer = model.encoder.transformer
        if isinstance(transformer, PeftModel):
            return
        config = self.config(model)
        transformer = get_peft_model(transformer, config, adapter_name=self.languages[0])
        for code in self.languages[1:]:
            transformer.add_adapter(code, config)
        for name, parameter in transformer.named_parameters():  # every adapter trains (each in its steps)
            parameter.requires_grad_("lora_" in name)
        model.encoder.transformer = transformer

    def use(self, model: nn.Module, adapter: str | None) -> None:
        """Activate ``adapter`` (None: the base model, every adapter off) on ``model``'s encoder."""
        transformer = model.encoder.transformer
        if adapter is None:
            transformer.base_model.disable_adapter_layers()
            return
        transformer.base_model.enable_adapter_layers()
        transformer.set_adapter(adapter)
        for (
            name,
            parameter,
        ) in transformer.named_parameters():  # set_adapter freezes the others: keep all trainable
            if "lora_" in name:
                parameter.requires_grad_(True)

    def gates(self, lang: str) -> torch.Tensor | None:
        self.use(self.model, self.adapter_of(lang))
        return None

    def eval_gates(self, lang: str) -> torch.Tensor | None:
        self.use(self.model, self.adapter_of(lang))
        return None

    def adapter_of(self, lang: str) -> str | None:
        """A source language's own adapter, or an unseen language's by ``lora.target_policy``."""
        if lang in self.languages:
            return lang
        if lang not in self.target_adapters:
            policy = setting(self.lora.target_policy)
            if policy == "support":
                raise ValueError(f"lora.target_policy=support: language {lang} has no support sentences prepared "
                                 "(an unseen language is evaluated after prepare_evaluation)")  # fmt: skip
            self.target_adapters[lang] = self.nearest(lang) if policy == "nearest" else None
        return self.target_adapters[lang]

    def nearest(self, lang: str) -> str:
        from subnets.analysis.typology import typological_similarity, uriel_code

        if uriel_code(lang) is None:
            raise ValueError(f"lora.target_policy=nearest: URIEL has no typology of language {lang}; use "
                             "lora.target_policy=support or full")  # fmt: skip
        known = [code for code in self.languages if uriel_code(code) is not None]
        if not known:
            raise ValueError("lora.target_policy=nearest: URIEL knows none of the source languages")
        codes, similarity = typological_similarity([lang, *known])
        row = dict(zip(codes, similarity[0]))
        return max(known, key=lambda code: row[code])

    def prepare_evaluation(self, model: nn.Module, support: Mapping[str, LanguageData]) -> None:
        self.target_adapters = {code: a for code, a in self.target_adapters.items() if code in self.languages}
        if setting(self.lora.target_policy) != "support":
            return
        for code, data in support.items():
            self.target_adapters[code] = self.lowest_support_loss(model, data)

    def lowest_support_loss(self, model: nn.Module, support: LanguageData) -> str:
        batches = self.batcher.fixed(support, 32, max(1, -(-len(support) // 32)), "support")
        losses = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for code in self.languages:
                self.use(model, code)
                losses[code] = sum(float(model(b).loss) for b in batches) / len(batches)
        model.train(was_training)
        return min(losses, key=losses.get)

    def adaptation(self, model: nn.Module, lang: str, support: LanguageData):
        if setting(self.lora.target_policy) == "support":
            self.target_adapters[lang] = self.lowest_support_loss(model, support)
        self.use(model, self.adapter_of(lang))
        return None, None

    def parameter_budget(self, model: nn.Module, languages) -> dict[str, Any]:
        self.use(
            model, self.languages[0]
        )  # every adapter trainable (an unseen language's "full" turns them off)
        return super().parameter_budget(model, languages)

    def updated_parameters(self, model: nn.Module, lang: str) -> int:
        """The task head, the shared trainable weights and ``lang``'s own adapter (others get no gradient)."""
        return sum(p.numel() for name, p in model.named_parameters()
                   if p.requires_grad and ("lora_" not in name or f".{lang}." in name))  # fmt: skip

    def summary(self) -> dict[str, Any]:
        unseen = {
            code: adapter or "none"
            for code, adapter in self.target_adapters.items()
            if code not in self.languages
        }
        return {**super().summary(), **({"target_adapters": unseen} if unseen else {})}


class ShiraPolicy(LoraPolicy):
    """SHiRA, sparse high-rank adapters (``+method=shira``, Bhardwaj et al. 2024), through peft's
    ``ShiraConfig``: the encoder's weights are frozen and, of each target projection
    (``shira.targets``, by default LoRA's), ``r x (in + out)`` coordinates train, as many as a
    rank-``r`` LoRA's parameters but an update of any rank. The coordinates are peft's random
    mask (``shira.mask_type=random``), a uniform draw from a generator seeded by the run's seed
    (peft seeds it again for each projection, so projections of one shape get the same
    coordinates); the policy's state keeps them, so a resume or ``load_run`` uses the trained
    ones. ``shira.match=static`` sizes ``r`` as ``lora.match=static`` sizes the rank.

    peft's SHiRA layer computes its projection's output itself, bypassing the forward hooks of
    the wrapped projection, among them the unit gates of the attention output projection
    ([UnitGates][subnets.models.gates.UnitGates]): the policy never sets gates, so nothing
    changes, and peft's warning about those hooks is not shown.
    """

    def __init__(self, shira: Any, search: Any = None):
        self.shira, self.search = shira, search  # search: the masks.* settings (shira.match=static)
        self.model: nn.Module | None = None
        self.rank = int(shira.r)
        self.matched: int | None = None
        self.seed = 0  # the run's seed, set when bound

    @property
    def matches_static_budget(self) -> bool:
        """Whether ``r`` is sized to a static subnetwork's budget (``shira.match=static``)."""
        return setting(self.shira.match) == "static"

    def config(self, model: nn.Module):
        from peft import ShiraConfig

        self.match_rank(model, self.shira, "shira")
        pattern = re.compile(lora_targets(model, self.shira, "shira"))
        transformer = model.encoder.transformer
        shapes = [m.weight.shape for n, m in transformer.named_modules() if pattern.fullmatch(n)]
        most = min(out * inp // (out + inp) for out, inp in shapes)  # peft: r x (in + out) <= in x out
        if self.rank > most:
            matched = "" if self.matched is None else f" (matched to a static subnetwork's {self.matched})"
            raise SettingError(f"shira.r={self.rank}{matched}: more coordinates than a target projection holds; r x "
                               f"(in + out) <= in x out allows r <= {most} here; lower it (shira.r, or masks.keep_ratio "
                               "/ masks.top_k with shira.match=static) or add targets (shira.targets)")  # fmt: skip
        return ShiraConfig(r=self.rank, mask_type=str(setting(self.shira.mask_type)), random_seed=self.seed,
                           target_modules=lora_targets(model, self.shira, "shira"))  # fmt: skip

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        self.seed = int(batcher.seed)
        super().bind(model, batcher, languages)
        _quiet_hook_warning(model.encoder.transformer)

    def layers(self) -> dict[str, nn.Module]:
        """The SHiRA layers of the bound model's encoder, by module name."""
        from peft.tuners.shira import ShiraLayer

        modules = self.model.encoder.transformer.named_modules()
        return {name: m for name, m in modules if isinstance(m, ShiraLayer)}

    def state_dict(self) -> dict[str, Any]:
        """The trained coordinates (``[2, n]`` row and column indices per layer; peft's
        ``shira_indices`` are not parameters, so the model's state does not hold them)."""
        indices = {name: m.shira_indices["default"].cpu() for name, m in self.layers().items()}
        return {"shira_indices": indices}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        indices = state.get("shira_indices", {})
        for name, layer in self.layers().items():
            if name in indices:
                if indices[name].shape != layer.shira_indices["default"].shape:
                    raise ValueError(f"{name}: the checkpoint's SHiRA coordinates {tuple(indices[name].shape)} do "
                                     f"not fit the layer's {tuple(layer.shira_indices['default'].shape)} (shira.r?)")  # fmt: skip
                device = layer.shira_weight["default"].device
                layer.shira_indices["default"] = indices[name].to(device=device, dtype=torch.int)

    def summary(self) -> dict[str, Any]:
        matched = {} if self.matched is None else {"matched_budget": self.matched}
        mask = str(setting(self.shira.mask_type))
        return {"shira": {"r": self.rank, "mask_type": mask, "seed": self.seed, **matched}}


def _quiet_hook_warning(transformer: nn.Module) -> None:
    """Tell peft's once-per-layer warning about hooks a SHiRA layer bypasses that it has warned
    (its cache), without a warning: the policy's docstring says why they do not matter."""
    from peft.tuners.shira import ShiraLayer, layer

    warn = getattr(layer, "_warn_once_about_module_hooks", None)
    if warn is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in transformer.modules():
            if isinstance(module, ShiraLayer):
                warn(module)
