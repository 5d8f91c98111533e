"""LoRA baselines through peft: one LoRA for all languages (``+method=lora``) and one per source
language (``+method=language_lora``, as MAD-X's language adapters, with LoRA modules).

The encoder is wrapped by ``peft.get_peft_model`` when the policy is bound (before the optimizer
is built and before a checkpoint is loaded, so parameter names are the same in training,
resumes, evaluation and ``load_run``): its weights are frozen, the LoRA matrices of the target
projections (``lora.targets``, by default the layout's query, key, value and attention output
projections) and the task head train.

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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from subnets.config import SettingError, setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.methods.base import MaskPolicy
from subnets.methods.subnetworks import subnetwork_budget

log = logging.getLogger(__name__)


def lora_targets(model: nn.Module, settings: Any) -> str:
    """peft's ``target_modules``: a regular expression matching the target projections of every
    layer of ``model.encoder.transformer``, from ``lora.targets`` or the layout.

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
        raise SettingError(f"lora.targets: {', '.join(missing)} is not a projection of the layers at "
                           f"{layout.layers} (the layout's are {layout.query}, {layout.key}, {layout.value}, "
                           f"{layout.output}; a layer holds e.g. {', '.join(sorted(_layer_children(names, layout.layers))[:6])})")  # fmt: skip
    return pattern


def lora_parameters_per_rank(model: nn.Module, settings: Any) -> int:
    """The parameters one LoRA adds per unit of rank: ``in + out`` features of every target
    projection (its ``A`` is ``rank x in``, its ``B`` ``out x rank``)."""
    pattern = re.compile(lora_targets(model, settings))
    return sum(sum(module.weight.shape) for name, module in model.encoder.transformer.named_modules()
               if pattern.fullmatch(name))  # fmt: skip


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

    def config(self, model: nn.Module):
        from peft import LoraConfig

        if setting(self.lora.match) == "static" and self.matched is None:
            self.matched = subnetwork_budget(model, self.search)
            per_rank = lora_parameters_per_rank(model, self.lora)
            self.rank = max(1, round(self.matched / per_rank))
            log.info("lora.match=static: rank %d (%d parameters per adapter) for a static subnetwork's %d",
                     self.rank, self.rank * per_rank, self.matched)  # fmt: skip
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
