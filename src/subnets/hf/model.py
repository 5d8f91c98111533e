"""Language subnetworks on any Hugging Face model: [with_subnetworks][subnets.hf.model.with_subnetworks] and
[find_subnetworks][subnets.hf.find.find_subnetworks].

The wrapper gates the model's attention heads and/or feed-forward neurons
([UnitGates][subnets.models.gates.UnitGates], so every layout subnets knows works: BERT, XLM-R,
ModernBERT, mT5 encoders, decoder LLMs, any ``AutoModelFor*`` head on them) by the language of
each example, and tells an optimizer which weights that language may update::

    model = with_subnetworks(AutoModelForTokenClassification.from_pretrained(...), SubnetworkConfig())
    find_subnetworks(model, {"de": german, "fr": french})        # datasets.Dataset per language
    model(**batch, language=["de", "fr", "de"])                  # each example through its language's units
    with model.language("de"):                                   # or model.set_language("de")
        logits = model(**inputs).logits

A batch may mix languages: each example is gated by its own language's mask (per-example gates),
so its gradient reaches only its language's units, and the update mask of a step is the union
of the masks of the languages it saw. [SubnetworkTrainer][subnets.hf.trainer.SubnetworkTrainer] and
[masked_optimizer][subnets.hf.masked_optimizer] (for an ``accelerate`` loop) turn that into exact masked
updates.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from subnets.hf import updates
from subnets.hf.config import SubnetworkConfig
from subnets.hf.hub import (
    Subnetworks,
    base_identity,
    changed_tensors,
    fingerprint,
    load_trained_weights,
)
from subnets.masks import core
from subnets.masks.dynamic import ImportanceEMA
from subnets.masks.subnetwork import MaskMismatchError, Subnetwork, SubnetworkSet
from subnets.models.gates import UnitGates, gate_probe
from subnets.models.layouts import ModelLayout
from subnets.optim.masked import MaskedOptimizer, UpdateMask

log = logging.getLogger(__name__)

LANGUAGE_COLUMN = "language"


class SubnetworkModel(nn.Module):
    """A Hugging Face model whose units are gated by language (build it with
    [with_subnetworks][subnets.hf.model.with_subnetworks]).

    Attributes other than its own are the wrapped model's (``model.config``, ``model.generate``, ...).

    Args:
        model: a ``PreTrainedModel`` (any head); its ``base_model`` is gated.
        config: the [SubnetworkConfig][subnets.hf.model.SubnetworkConfig].
        masks: the languages' subnetworks (default: none; [find_subnetworks][subnets.hf.find_subnetworks]).
        layout: the transformer's [ModelLayout][subnets.models.layouts.ModelLayout] where it is not detected.

    Attributes:
        model: the wrapped model.
        subnetwork_config: the config.
        gates: the [UnitGates][subnets.models.gates.UnitGates] on ``model.base_model``.
        masks: the [SubnetworkSet][subnets.masks.SubnetworkSet] (language -> subnetwork).
        active_language: the language of inputs given without one (``set_language``).
        ema: the dynamic rule's [ImportanceEMA][subnets.masks.dynamic.ImportanceEMA] (None otherwise).
        steps: optimizer steps taken (``after_optimizer_step``).
        base_fingerprint: the sha256 of each tensor of the model when wrapped (``save_pretrained``
            saves the tensors that differ; loading refuses a base model without these weights).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SubnetworkConfig | None = None,
        masks: SubnetworkSet | None = None,
        layout: ModelLayout | None = None,
    ):
        super().__init__()
        self.model = model
        self.subnetwork_config = config or SubnetworkConfig()
        self.gates = UnitGates(model.base_model, self.subnetwork_config.units, layout)
        self.masks = SubnetworkSet(self.gates.num_layers, self.gates.units)
        self.active_language: str | None = None
        dynamic = self.subnetwork_config.rule == "dynamic"
        self.ema = ImportanceEMA(self.gates.shape, self.subnetwork_config.ema_decay, self.gates.units) if dynamic else None  # fmt: skip
        self.steps = 0
        self._probes: list[tuple[torch.Tensor, list[str]]] = []  # gate probes of forwards since the last step
        self._seen: set[str] = set()  # languages trained on since the last step
        self._update_masks: dict[frozenset, UpdateMask | None] = {}
        self._warned: set[str] = set()
        self._forward_names = set(inspect.signature(model.forward).parameters)
        self.base_fingerprint = fingerprint(model)
        if masks is not None:
            self.set_masks(masks)
        half = [n for n, p in model.named_parameters() if p.dtype == torch.float16 and p.device.type == "cpu"]
        if half:  # transformers 5 keeps a checkpoint's precision (e5-small's is float16)
            log.warning("%d of the model's parameters (%s, ...) are float16 on the CPU: their forward and backward "
                        "run many times slower there and training loses precision; load the model with "
                        "dtype=torch.float32", len(half), half[0])  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the wrapped model takes the Trainer's loss arguments (``num_items_in_batch``):
        the Trainer reads this, and the wrapper's own ``**kwargs`` must not answer for it."""
        if hasattr(self.model, "accepts_loss_kwargs"):
            return bool(self.model.accepts_loss_kwargs)
        parameters = inspect.signature(self.model.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    # ------------------------------------------------------------------ masks and languages
    def set_masks(self, masks: SubnetworkSet) -> None:
        """Use ``masks`` (checked against this model's geometry)."""
        masks.check_compatible(SubnetworkSet(self.gates.num_layers, self.gates.units), "the subnetworks")
        self.masks, self._update_masks = masks, {}
        updates.train_alone(self, masks)  # with train='subnetwork'

    def subnetwork(self, language: str) -> Subnetwork | None:
        """``language``'s subnetwork, or None (the whole model) for a language without one under
        ``target_policy='full'``.

        Raises:
            KeyError: a language without a subnetwork under ``target_policy`` ``'error'``, or the
                runner's ``'support'`` and ``'nearest'`` (from support sentences the wrapper does not hold).
        """
        if language in self.masks:
            return self.masks[language]
        known, policy = ", ".join(self.masks) or "none yet", self.subnetwork_config.target_policy
        why = {"error": "refuses it", "support": "estimates it from support sentences, which the wrapper does not "
               "hold", "nearest": "takes it from support sentences, which the wrapper does not hold"}.get(policy)  # fmt: skip
        if why is not None:
            raise KeyError(f"no subnetwork for language {language!r} (the set has: {known}) and target_policy="
                           f"{policy!r} {why}; find one (find_subnetworks) or use target_policy='full'")  # fmt: skip
        if language not in self._warned and len(self.masks):
            self._warned.add(language)
            log.warning("no subnetwork for language %r (the set has: %s): target_policy='full' runs it "
                        "through the whole model", language, known)  # fmt: skip
        return None

    def set_language(self, language: str | None) -> None:
        """The language of inputs given without ``language=`` from now on (None: the whole model).

        Raises:
            KeyError: ``language`` has no subnetwork and ``target_policy='error'``, or it is not a
                language code at all.
        """
        if language is not None:
            if not isinstance(language, str) or not language.strip() or language != language.strip():
                raise KeyError(f"set_language({language!r}): expected a language code such as 'de'")
            if language not in self.masks and self.masks:
                from subnets.analysis.typology import uriel_code

                if uriel_code(language) is None:
                    raise KeyError(f"set_language({language!r}): not a language code the set has "
                                   f"({', '.join(self.masks)}) nor an ISO 639 code")  # fmt: skip
            self.subnetwork(language)
        self.active_language = language

    @contextlib.contextmanager
    def language(self, language: str | None) -> Iterator[SubnetworkModel]:
        """``with model.language("de"):`` -- ``set_language`` inside the block, then the previous one."""
        previous = self.active_language
        self.set_language(language)
        try:
            yield self
        finally:
            self.active_language = previous

    # ------------------------------------------------------------------ forward
    def forward(self, *args, language: str | Sequence[str] | None = None, **kwargs):
        """The wrapped model's forward, each example through its language's units.

        Args:
            language: one code for the batch, one per example (a batch's ``language`` column),
                or None for ``active_language``.
        """
        size = _batch_size(args, kwargs)
        languages = self._languages(language, size)
        tracking = (
            self.ema is not None and self.training and torch.is_grad_enabled() and languages is not None
        )
        values = self.gate_values(languages) if languages is not None else None
        if tracking:
            shape = self.gates.shape if values is None or values.ndim == 2 else values.shape
            values = gate_probe(tuple(shape), values, next(self.model.parameters()))
            self._probes.append((values, languages))
        if self.training and torch.is_grad_enabled() and languages is not None:
            self._seen.update(languages)
        with self.gates.applied(values):
            return self.model(*args, **kwargs)

    def _languages(self, language, size: int | None) -> list[str] | None:
        if language is None:
            language = self.active_language
        if language is None:
            if self.training and len(self.masks) and torch.is_grad_enabled():
                raise ValueError(f"a training batch without a language: the subnetworks ({', '.join(self.masks)}) need "
                                 f"each example's language: give the dataset a '{LANGUAGE_COLUMN}' column "
                                 "(SubnetworkTrainer), call model(..., language=...) or model.set_language(code)")  # fmt: skip
            return None
        if isinstance(language, str):
            return [language] * (size or 1)
        languages = [str(code) for code in language]
        if size is not None and len(languages) != size:
            raise ValueError(f"language= gives {len(languages)} codes for a batch of {size} examples")
        return languages

    def gate_values(self, languages: Sequence[str]) -> torch.Tensor | None:
        """The forward gates for examples of ``languages``: None (no gating) where no example's
        language restricts the forward, ``[layers, units]`` for a batch of one language,
        ``[batch, layers, units]`` for a mixed one."""
        apply = self.subnetwork_config.apply  # [gate_values][subnets.masks.core.gate_values] per language
        rows = {code: core.gate_values(self.subnetwork(code), apply) for code in dict.fromkeys(languages)}
        if all(row is None for row in rows.values()):
            return None
        device = next(self.model.parameters()).device
        rows = {code: torch.ones(self.gates.shape) if row is None else row for code, row in rows.items()}
        if len(rows) == 1:
            return next(iter(rows.values())).to(device)
        return torch.stack([rows[code] for code in languages]).to(device)

    # ------------------------------------------------------------------ updates (subnets.hf.updates)
    def update_mask(self, languages: Iterable[str]) -> UpdateMask | None:
        """What a step on examples of ``languages`` may update ([subnets.hf.updates.update_mask][])."""
        return updates.update_mask(self, languages)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> UpdateMask | None:
        """Call after the backward pass(es) of a step, before clipping and the optimizer step
        ([subnets.hf.updates.before_optimizer_step][])."""
        return updates.before_optimizer_step(self, optimizer)

    def after_optimizer_step(self) -> bool:
        """Call after the optimizer step ([subnets.hf.updates.after_optimizer_step][])."""
        return updates.after_optimizer_step(self)

    def task_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The wrapped model's loss on ``batch`` under the gates in use (no language gating of its
        own; columns the model does not take are left out)."""
        device = next(self.model.parameters()).device
        inputs = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k in self._forward_names
        }
        output = self.model(**inputs)
        loss = output.loss if hasattr(output, "loss") else output[0]
        if loss is None:
            raise ValueError(f"{type(self.model).__name__} returned no loss: the batches need labels "
                             f"(columns given: {', '.join(batch)})")  # fmt: skip
        return loss

    # ------------------------------------------------------------------ state and sharing
    def subnetwork_state(self) -> dict[str, Any]:
        """The masks, the dynamic rule's averages and the step count (for checkpoints)."""
        return {"masks": self.masks.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "steps": self.steps}  # fmt: skip

    def load_subnetwork_state(self, state: Mapping[str, Any]) -> None:
        self.set_masks(SubnetworkSet.from_state_dict(state["masks"]))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.steps = int(state["steps"])

    def save_pretrained(self, folder, made_by: str | None = None, **kwargs) -> None:
        """Write the subnetwork set as [Subnetworks][subnets.hf.hub.Subnetworks] (masks, config, base
        model and its ``base_fingerprint``, model card) and what training changed: each tensor of
        the wrapped model that differs from the one it had when wrapped, in full (the task head
        included; none without training: masks only). ``kwargs`` go to
        ``Subnetworks.save_pretrained`` (e.g. ``push_to_hub=True, repo_id=...``)."""
        base = {**base_identity(self.model), "fingerprint": self.base_fingerprint}
        changed = changed_tensors(self.model, self.base_fingerprint)
        return Subnetworks(self.masks, self.subnetwork_config, base, made_by, changed).save_pretrained(folder, **kwargs)  # fmt: skip

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder_or_repo: str, layout: ModelLayout | None = None,
                        **kwargs) -> SubnetworkModel:  # fmt: skip
        """``model`` with the subnetwork set saved in ``folder_or_repo`` (a folder or a Hub repository;
        ``kwargs`` go to ``Subnetworks.from_pretrained``, e.g. ``revision``).

        Raises:
            MaskMismatchError: the set was made for a model of another geometry (both are named).
            ValueError: ``model``'s weights are not those the set was made from (the first
                differing tensor is named).
        """
        shared = Subnetworks.from_pretrained(folder_or_repo, **kwargs)
        wrapped = cls(model, shared.subnetwork_config, layout=layout)
        try:
            wrapped.set_masks(shared.masks)
        except MaskMismatchError:
            ours = shared.base.get("name") or "an unnamed model"
            theirs = base_identity(model).get("name") or "this model"
            raise MaskMismatchError(f"{folder_or_repo}: these subnetworks were made for {ours} with "
                                    f"{shared.masks.describe()}; {theirs} ({type(model).__name__}) has "
                                    f"{wrapped.masks.describe()}") from None  # fmt: skip
        load_trained_weights(model, wrapped.base_fingerprint, shared, folder_or_repo)
        return wrapped


def with_subnetworks(model: nn.Module, config: SubnetworkConfig | None = None, masks: SubnetworkSet | None = None,
                     layout: ModelLayout | None = None) -> SubnetworkModel:  # fmt: skip
    """``model`` (any ``PreTrainedModel`` whose layout subnets knows or is given) with language
    subnetworks ([SubnetworkModel][subnets.hf.model.SubnetworkModel]).

    Raises:
        UnknownLayoutError: the model's layout is not known; the message says how to declare it.
    """
    return SubnetworkModel(model, config, masks, layout)


def masked_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> MaskedOptimizer:
    """``optimizer`` wrapped so that its steps follow ``model.before_optimizer_step`` (exact masked
    updates, Adam moments included) -- for an ``accelerate`` or hand-written loop."""
    return MaskedOptimizer(optimizer, model.named_parameters())


def _batch_size(args: tuple, kwargs: Mapping) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), *args):
        if torch.is_tensor(value) and value.ndim >= 1:
            return int(value.shape[0])
    return None


__all__ = ["LANGUAGE_COLUMN", "SubnetworkModel", "masked_optimizer", "with_subnetworks"]  # fmt: skip
