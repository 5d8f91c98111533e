"""Lottery-ticket sparse fine-tuning (``+method=lt_sft``; Ansell et al. 2022, composable-sft).

Shared variant (``sft.per_language=false``): the first ``sft.full_steps`` steps fine-tune the whole
model; then the ``k`` encoder parameters that moved most (``|theta - theta_0|``, over all encoder
tensors together) form the ticket, the encoder is reset to its pretrained values ``theta_0``, the
optimizer state is cleared, and the remaining steps update only the ticket (exactly, through
:class:`~subnets.optim.MaskedOptimizer`). Per-language variant (``sft.per_language=true``): before
training, a copy of the model is fine-tuned for ``sft.full_steps`` steps on each source language
alone and that language's ticket is taken from it; multilingual training then updates, in a step
of language ``l``, only ``l``'s ticket. The task head trains in every step of both variants (it
is not part of the pretrained model).

``k`` is ``sft.k``, or ``sft.keep_ratio`` of the encoder's parameters, or with
``sft.match=static`` the parameters a static subnetwork of the ``masks.*`` settings updates in
its units (:func:`~subnets.methods.subnetworks.subnetwork_budget`). The tickets are saved with
the checkpoints (a resume continues the same sparse phase) and summarised in results.json.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from subnets.checkpoint import phase_rng
from subnets.config import SettingError, setting
from subnets.data.dataset import Batcher
from subnets.masks.importance import finetuned_copy
from subnets.methods.base import MaskPolicy, Outputs, SourceLanguages
from subnets.methods.subnetworks import subnetwork_budget
from subnets.optim.masked import MaskedOptimizer, UpdateMask
from subnets.update import StepResult

log = logging.getLogger(__name__)


def ticket(moved: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The ``k`` coordinates with the largest ``moved`` values over all tensors together (ties
    broken by position), as boolean masks by name."""
    flat = torch.cat([v.detach().flatten().double().cpu() for v in moved.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(-flat, stable=True).indices[:k]] = True
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

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        self.optimizer = MaskedOptimizer(optimizer, model.named_parameters())
        return self.optimizer

    def prepare(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        if not self.sft.per_language or self.tickets:
            return
        for lang, data in sources.train.items():
            with phase_rng(self.batcher.seed, f"sft/{lang}", self.batcher.device):
                tuned = finetuned_copy(model, self.batcher.fixed(data, sources.batch_size, 8, "sft"),
                                       int(self.sft.full_steps), sources.make_optimizer)  # fmt: skip
            self.tickets[lang] = ticket(self.moved(tuned), self.k)
            log.info("lt_sft: %s's ticket holds %d of %d encoder parameters", lang, self.k, self.encoder_size)

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

    def update_mask(self, lang: str) -> dict[str, torch.Tensor] | None:
        key = lang if self.sft.per_language else "shared"
        if key not in self.tickets:
            return None  # the full fine-tuning phase (or an unseen language: full fine-tuning)
        if key not in self._update_masks:
            device = next(self.model.parameters()).device
            self._update_masks[key] = UpdateMask({n: m.to(device) for n, m in self.tickets[key].items()})
        return self._update_masks[key]

    def summary(self) -> dict[str, Any]:
        return {
            "sft": {"k": self.k, "encoder_parameters": self.encoder_size, "tickets": sorted(self.tickets)}
        }

    def state_dict(self) -> dict[str, Any]:
        return {"tickets": {key: dict(masks) for key, masks in self.tickets.items()}}

    def load_state_dict(self, state) -> None:
        self.tickets = {
            key: {n: m.bool().cpu() for n, m in masks.items()}
            for key, masks in state.get("tickets", {}).items()
        }
        self._update_masks.clear()
