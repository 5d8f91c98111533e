"""Lottery-ticket sparse fine-tuning (``+method=lt_sft``; Ansell et al. 2022, composable-sft).

Shared variant (``sft.per_language=false``): the first ``sft.full_steps`` steps fine-tune the whole
model; then the ``k`` encoder parameters that moved most (``|theta - theta_0|``, over all encoder
tensors together) form the ticket, the encoder is reset to its pretrained values ``theta_0``, the
optimizer state is cleared and the learning-rate schedule starts again (warm-up and decay over
the remaining steps, as a second training would); the remaining steps update only the ticket
(exactly, through [MaskedOptimizer][subnets.optim.MaskedOptimizer]). Per-language variant
(``sft.per_language=true``): before training, a copy of the model is fine-tuned for ``sft.full_steps`` steps
on each source language alone and that language's ticket is taken from it; multilingual training then updates,
in a step of language ``l``, only ``l``'s ticket. The task head trains in every step of both variants (it
is not part of the pretrained model).

Composable variant (``sft.compose=true``, shared ticket): before training, each language with
raw text gets a language SFT ([subnets.methods.language_sft][]: LT-SFT with masked language
modelling, causal for a decoder, ``sft.language_steps`` steps per phase, ``sft.language_k`` parameters); a step,
evaluation or few-shot run of language ``l`` computes with the pretrained weights plus ``l``'s
language SFT plus the task SFT being trained, so that the task SFT learns what the language
SFTs do not hold. A language without text gets the task SFT alone.

``k`` is ``sft.k``, or ``sft.keep_ratio`` of the encoder's parameters, or with
``sft.match=static`` the parameters a static subnetwork of the ``masks.*`` settings updates in
its units ([subnetwork_budget][subnets.methods.subnetworks.subnetwork_budget]). The tickets are saved with
the checkpoints (a resume continues the same sparse phase) and summarised in results.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnets.config import SettingError, setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.masks.importance import finetuned_copy
from subnets.methods.base import MaskPolicy, Outputs, SourceLanguages
from subnets.methods.language_sft import (
    LanguageDeltas,
    composable_names,
    fit_language_sft,
    language_model_copy,
    text_of,
)
from subnets.methods.subnetworks import subnetwork_budget
from subnets.optim.masked import MaskedOptimizer, UpdateMask
from subnets.runs.checkpoint import phase_rng
from subnets.training.update import StepResult

log = logging.getLogger(__name__)


def ticket(moved: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The ``k`` coordinates with the largest ``moved`` values over all tensors together (ties
    broken by position), as boolean masks by name."""
    flat = torch.cat([v.detach().flatten().double().cpu() for v in moved.values()])
    # what a stable sort's first k would keep, without sorting every coordinate of a large model:
    # all above the k-th largest value, then the first of those equal to it
    threshold = -torch.kthvalue(-flat, k).values
    chosen = flat > threshold
    tied = (flat == threshold).nonzero().flatten()
    chosen[tied[: k - int(chosen.sum())]] = True
    masks, start = {}, 0
    for name, value in moved.items():
        masks[name] = chosen[start : start + value.numel()].view(value.shape)
        start += value.numel()
    return masks


class LotteryTicketSFT(MaskPolicy):
    """``+method=lt_sft``: module docstring."""

    supports_episodes = False  # its phases are counted in single-batch steps

    def __init__(self, sft: Any, search: Any = None):
        self.sft, self.search = sft, search  # search: the masks.* settings (sft.match=static)
        self.model: nn.Module | None = None
        self.optimizer: MaskedOptimizer | None = None
        self.pretrained: dict[str, torch.Tensor] = {}
        self.tickets: dict[str, dict[str, torch.Tensor]] = {}  # "shared" or a language -> name -> mask
        self._update_masks: dict[str, UpdateMask] = {}
        self.languages: LanguageDeltas | None = None  # sft.compose: the language SFTs

    @property
    def supports_mixed_batches(self) -> bool:
        return not self.sft.compose  # a composed step adds one language's SFT

    @property
    def matches_static_budget(self) -> bool:
        """Whether k is a static subnetwork's budget (``sft.match=static``; with
        ``masks.train=subnetwork``, the subnetwork-only one)."""
        return setting(self.sft.match) == "static"

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        self.model, self.batcher = model, batcher
        # theta_0: bind runs on the freshly built model, before a resume loads a checkpoint
        self.pretrained = {n: p.detach().clone() for n, p in model.encoder_parameters() if p.requires_grad}
        total = sum(v.numel() for v in self.pretrained.values())
        if setting(self.sft.match) == "static":
            self.k = subnetwork_budget(model, self.search)
            log.info("sft.match=static: k = %d, a static subnetwork's budget", self.k)
        elif self.sft.k is not None:
            self.k = int(self.sft.k)
        else:
            self.k = int(round(self.sft.keep_ratio * total))
        if not 0 < self.k <= total:
            raise SettingError(f"sft.k={self.sft.k} (sft.keep_ratio={self.sft.keep_ratio}): expected between 1 and "
                               f"the encoder's {total} trainable parameters")  # fmt: skip
        # the sparse phase is a training of its own: a fresh warm-up and decay from the reset on
        self.schedule_restart = None if self.sft.per_language else int(self.sft.full_steps)
        if self.sft.compose:
            if self.sft.per_language:
                raise SettingError(
                    "sft.compose=true composes language SFTs with one task SFT: use sft.per_language=false"
                )
            if self.languages is None:
                self.languages = LanguageDeltas(model)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        self.optimizer = MaskedOptimizer(optimizer, model.named_parameters())
        return self.optimizer

    def prepare(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        if self.sft.compose and not self.languages.deltas:
            self.fit_language_sfts(model, sources)
        if not self.sft.per_language or self.tickets:
            return
        for lang, data in sources.train.items():
            with phase_rng(self.batcher.seed, f"sft/{lang}", self.batcher.device):
                tuned = finetuned_copy(model, self.batcher.fixed(data, sources.batch_size, 8, "sft"),
                                       int(self.sft.full_steps), sources.make_optimizer)  # fmt: skip
            self.tickets[lang] = ticket(self.moved(tuned), self.k)
            log.info("lt_sft: %s's ticket holds %d of %d encoder parameters", lang, self.k, self.encoder_size)

    def fit_language_sfts(self, model: nn.Module, sources: SourceLanguages) -> None:
        """A language SFT for every source language and every language with text under
        ``sft.language_text`` (module docstring)."""
        texts = {code: text_of(data) for code, data in sources.train.items()}
        texts.update(self.read_texts(sources.tokenizer))
        pretrained = {n: self.pretrained[n] for n in composable_names(model, self.pretrained)}
        size = sum(v.numel() for v in pretrained.values())
        k = int(self.sft.language_k) if self.sft.language_k is not None else min(self.k, size)
        if not 0 < k <= size:
            raise SettingError(f"sft.language_k={self.sft.language_k}: expected between 1 and the {size} parameters "
                               "a language SFT can hold")  # fmt: skip
        steps, max_length = int(self.sft.language_steps), self.batcher.collator.max_length
        for code, text in sorted(texts.items()):
            with phase_rng(self.batcher.seed, f"sft/language/{code}", self.batcher.device):
                lm, batcher = language_model_copy(model, pretrained, sources.tokenizer, max_length)
                batcher.seed = self.batcher.seed
                batches = batcher.fixed(text, sources.batch_size, max(1, steps), "language-sft")
                delta = fit_language_sft(lm, pretrained, batches, steps, k, sources.make_optimizer, ticket)
            self.languages.add(code, delta)
            log.info("lt_sft: %s's language SFT holds %d parameters (language modelling on %d lines, %d + %d steps)",
                     code, sum(len(i) for i, _ in delta.values()), len(text), steps, steps)  # fmt: skip

    def read_texts(self, tokenizer) -> dict[str, LanguageData]:
        """The raw text of each language under ``sft.language_text`` (``<code>/train.txt``, else
        the words of ``<code>/train.conllu``)."""
        if not self.sft.language_text:
            return {}
        from subnets.tasks.lm import LanguageModelling

        root = Path(self.sft.language_text)
        if not root.is_dir():
            raise SettingError(f"sft.language_text={root}: not a folder (expected <code>/train.txt or "
                               "<code>/train.conllu per language)")  # fmt: skip
        texts = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            path = next(
                (folder / f"train{s}" for s in (".txt", ".conllu") if (folder / f"train{s}").exists()), None
            )
            if path is not None:
                lines = LanguageModelling().read(path).examples
                texts[folder.name] = LanguageData(folder.name, "text", lines, path=path).tokenize(tokenizer)
        if not texts:
            raise SettingError(f"sft.language_text={root}: no <code>/train.txt or <code>/train.conllu in it")
        return texts

    @property
    def encoder_size(self) -> int:
        return sum(v.numel() for v in self.pretrained.values())

    def moved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``|theta - theta_0|`` of each trainable encoder tensor of ``model``."""
        current = dict(model.named_parameters())
        return {n: (current[n].detach() - start).abs() for n, start in self.pretrained.items()}

    def after_step(self, step: int, result: StepResult) -> dict[str, float]:
        if self.sft.per_language or self.tickets or step < self.sft.full_steps:
            return {}
        self.tickets["shared"] = ticket(self.moved(self.model), self.k)
        with torch.no_grad():
            named = dict(self.model.named_parameters())
            for name, start in self.pretrained.items():
                named[name].copy_(start)
        self.optimizer.state.clear()  # the sparse phase starts with fresh moments
        log.info("lt_sft: after %d steps of full fine-tuning, the ticket holds %d of %d encoder parameters; "
                 "the encoder is reset to its pretrained values", step, self.k, self.encoder_size)  # fmt: skip
        return {"sft/ticket": float(self.k)}

    def gates(self, lang: str) -> torch.Tensor | None:
        if self.languages is not None:
            self.languages.activate(lang)
        return None

    def eval_gates(self, lang: str) -> torch.Tensor | None:
        return self.gates(lang)

    def adaptation(self, model: nn.Module, lang: str, support: LanguageData):
        self.gates(lang)  # few-shot fine-tuning of every parameter, on top of lang's language SFT
        return None, None

    def update_mask(self, lang: str) -> dict[str, torch.Tensor] | None:
        key = lang if self.sft.per_language else "shared"
        if key not in self.tickets:
            return None  # the full fine-tuning phase (or an unseen language: full fine-tuning)
        if key not in self._update_masks:
            device = next(self.model.parameters()).device
            self._update_masks[key] = UpdateMask({n: m.to(device) for n, m in self.tickets[key].items()})
        return self._update_masks[key]

    def summary(self) -> dict[str, Any]:
        out = {"k": self.k, "encoder_parameters": self.encoder_size, "tickets": sorted(self.tickets)}
        if self.languages is not None:
            out["language_sfts"] = {code: sum(len(i) for i, _ in delta.values())
                                    for code, delta in sorted(self.languages.deltas.items())}  # fmt: skip
        return {"sft": out}

    def state_dict(self) -> dict[str, Any]:
        state = {"tickets": {key: dict(masks) for key, masks in self.tickets.items()}}
        if self.languages is not None:
            state["language_sfts"] = self.languages.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        self.tickets = {
            key: {n: m.bool().cpu() for n, m in masks.items()}
            for key, masks in state.get("tickets", {}).items()
        }
        self._update_masks.clear()
        if self.languages is not None and "language_sfts" in state:
            self.languages.load_state_dict(state["language_sfts"])
