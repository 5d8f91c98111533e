"""Language sparse fine-tunings for composable LT-SFT (``+method=lt_sft sft.compose=true``;
Ansell et al. 2022): a language's SFT is lottery-ticket sparse fine-tuning of the pretrained
encoder with masked language modelling (causal for a decoder) on the language's raw text, kept
as its difference from the pretrained values, and added to the model wherever that language is
trained or evaluated.

[fit_language_sft][subnets.methods.language_sft.fit_language_sft] trains one on a copy of the encoder (the
run's model is not touched); [LanguageDeltas][subnets.methods.language_sft.LanguageDeltas] adds the active
language's difference to a model without changing its
weights: every module whose output is linear in its parameters (``nn.Linear``, ``nn.Embedding``,
``nn.LayerNorm``) computes ``f(x; theta) + f(x; phi) = f(x; theta + phi)`` (equal to the merged
weights up to float round-off), so that the task SFT's gradient is taken at ``theta + phi``
while the optimizer, the checkpoints and the ticket see ``theta`` alone. Parameters of other
modules (e.g. RMSNorm weights) are left out of language SFTs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from subnets.data.dataset import Batcher, LanguageData
from subnets.optim.masked import MaskedOptimizer, UpdateMask

LINEAR_IN_PARAMETERS = (nn.Linear, nn.Embedding, nn.LayerNorm)

SparseDelta = dict[str, tuple[torch.Tensor, torch.Tensor]]  # parameter name -> (flat indices, values)


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (its module, attribute) for modules linear in their parameters."""
    return {f"{module_name}.{p}" if module_name else p: (module, p)
            for module_name, module in model.named_modules() if isinstance(module, LINEAR_IN_PARAMETERS)
            for p, _ in module.named_parameters(recurse=False)}  # fmt: skip


def composable_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The parameters among ``names`` that [LanguageDeltas][subnets.methods.language_sft.LanguageDeltas] can
    add a difference to: those of modules linear in their parameters."""
    owners = _owners(model)
    return [name for name in names if name in owners]


class LanguageDeltas:
    """Per-language sparse differences added to ``model``'s outputs while a language is active
    (module docstring). ``deltas[code]`` is a ``SparseDelta`` by ``model``'s parameter names.

    Example::

        deltas = LanguageDeltas(model)
        deltas.add("de", {"encoder.transformer.encoder.layer.0.output.dense.weight": (indices, values)})
        deltas.activate("de")     # model(batch) now computes with theta + phi_de
        deltas.activate(None)     # the model's own weights
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.deltas: dict[str, SparseDelta] = {}
        self.active: str | None = None
        self._dense: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self._owners = _owners(model)
        self._handles = [module.register_forward_hook(self._hook)
                         for module in {m for m, _ in self._owners.values()}]  # fmt: skip

    def __deepcopy__(self, memo) -> LanguageDeltas:
        return (
            self  # a copied model's hooks find none of its modules here: a copy computes with its own weights
        )

    def add(self, code: str, delta: SparseDelta) -> None:
        unknown = [name for name in delta if name not in self._owners]
        if unknown:
            raise ValueError(f"language SFT of {code}: {unknown[0]} is not a parameter of a module linear in its "
                             f"parameters ({', '.join(t.__name__ for t in LINEAR_IN_PARAMETERS)})")  # fmt: skip
        self.deltas[code] = delta
        if self.active == code:
            self.activate(code, force=True)

    def activate(self, code: str | None, force: bool = False) -> None:
        """Add ``code``'s difference from now on (None, or a language without one: nothing)."""
        code = code if code in self.deltas else None
        if code == self.active and not force:
            return
        self.active, self._dense = code, {}
        for name, (indices, values) in (self.deltas.get(code) or {}).items():
            module, attribute = self._owners[name]
            parameter = getattr(module, attribute)
            dense = torch.zeros(parameter.numel(), dtype=parameter.dtype, device=parameter.device)
            dense[indices.to(parameter.device)] = values.to(parameter.device, parameter.dtype)
            self._dense.setdefault(module, {})[attribute] = dense.view_as(parameter)

    def _hook(self, module: nn.Module, args, output):
        delta = self._dense.get(module)
        if delta is None:
            return None
        x = args[0]
        if isinstance(module, nn.Linear):
            weight = delta.get("weight", torch.zeros_like(module.weight))
            return output + F.linear(x, weight, delta.get("bias"))
        if isinstance(module, nn.Embedding):
            return output + F.embedding(x, delta["weight"], module.padding_idx)
        weight = delta.get("weight", torch.zeros_like(module.weight)) if module.weight is not None else None
        return output + F.layer_norm(x, module.normalized_shape, weight, delta.get("bias"), module.eps)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._dense, self.active = [], {}, None

    def state_dict(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        # int32 positions: a tensor of the supported models holds fewer than 2**31 entries
        return {code: {name: {"indices": i.to(torch.int32), "values": v} for name, (i, v) in delta.items()}
                for code, delta in self.deltas.items()}  # fmt: skip

    def load_state_dict(self, state: Mapping) -> None:
        self.deltas = {code: {name: (d["indices"].long().cpu(), d["values"].cpu()) for name, d in delta.items()}
                       for code, delta in state.items()}  # fmt: skip
        self.activate(None, force=True)


def fit_language_sft(
    lm: nn.Module,
    pretrained: Mapping[str, torch.Tensor],
    batches: list,
    steps: int,
    k: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    ticket: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]],
) -> SparseDelta:
    """LT-SFT of the language model ``lm`` (a copy, changed in place) on ``batches``: ``steps``
    steps of full fine-tuning, the ``k`` parameters of ``pretrained`` (name -> its pretrained
    value) that moved most, a reset of those tensors to ``pretrained``, ``steps`` steps updating
    only the ticket; returns the ticket's differences from ``pretrained``. The language model's
    own head trains in both phases and is not part of the result."""
    named = dict(lm.named_parameters())

    def train(optimizer: torch.optim.Optimizer) -> None:
        lm.train()
        trainable = [p for p in lm.parameters() if p.requires_grad]
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            lm(batches[step % len(batches)]).loss.backward()
            nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()

    train(make_optimizer(lm))
    chosen = ticket({n: (named[n].detach() - start).abs() for n, start in pretrained.items()}, k)
    with torch.no_grad():
        for name, start in pretrained.items():
            named[name].copy_(start)
    masked = MaskedOptimizer(make_optimizer(lm), lm.named_parameters())
    masked.update_mask = UpdateMask({n: m.to(named[n].device) for n, m in chosen.items()})
    train(masked)
    delta: SparseDelta = {}
    for name, start in pretrained.items():
        indices = chosen[name].flatten().nonzero().squeeze(1)
        if indices.numel():
            moved = (named[name].detach() - start).flatten().cpu()
            delta[name] = (indices, moved[indices].clone())
    return delta


def text_of(data: LanguageData) -> LanguageData:
    """A language's examples as raw text for language modelling (their words and pieces)."""
    from subnets.tasks.lm import TextLine

    lines = [TextLine(str(getattr(e, "sent_id", i)), list(e.forms)) for i, e in enumerate(data.examples)]
    return LanguageData(data.code, "text", lines, data.pieces, data.path)


def language_model_copy(model: nn.Module, pretrained: Mapping[str, torch.Tensor], tokenizer,
                        max_length: int) -> tuple[nn.Module, Batcher]:  # fmt: skip
    """A language model on a copy of ``model.encoder`` reset to ``pretrained`` (names of
    ``model``): masked for a bidirectional encoder, causal for a decoder; and a batcher for it
    (windows of ``max_length`` subwords)."""
    from subnets.tasks.lm import LanguageModelling, TextCollator

    encoder = copy.deepcopy(model.encoder)
    causal = encoder.gates.layout.causal
    task = LanguageModelling("causal" if causal else "masked")
    task.use_model(encoder.transformer, tokenizer, causal)
    lm = task.build_model(encoder)
    named = dict(lm.named_parameters())
    with torch.no_grad():
        for name, value in pretrained.items():
            named[name].copy_(value)
    reference = next(model.parameters())
    collator = TextCollator(tokenizer, max_length, causal)
    return lm.to(reference.device, reference.dtype), Batcher(collator, reference.device)
