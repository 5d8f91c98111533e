"""Dynamic subnetworks: masks re-selected jointly with the model while it trains, by a rule
(the moving average of gate gradients, learned hard-concrete gates, or random scores as a control)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from subnets.config import setting
from subnets.data.dataset import Batcher
from subnets.files import atomic_write_json
from subnets.masks.controls import generator
from subnets.masks.core import ema_reselect
from subnets.masks.dynamic import HardConcreteGates, ImportanceEMA, reselect
from subnets.masks.figures import history_figure
from subnets.masks.selection import Units
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet
from subnets.methods.base import Outputs, SourceLanguages
from subnets.methods.static import static_masks
from subnets.methods.subnetworks import RandomControl, SubnetworkPolicy
from subnets.training.update import StepResult


class ScoreRule:
    """A dynamic rule that re-selects each language's mask from per-head scores with the
    configured selection (``dynamic.selection`` with ``masks.keep_ratio``, ``top_k``, ...).
    Its hooks do nothing; [EMARule][subnets.methods.dynamic.EMARule] and
    [RandomRule][subnets.methods.dynamic.RandomRule] say where the scores come from."""

    track_gates = False
    supports_episodes = True
    supports_mixed_batches = True

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
        search = self.search  # the current mask where the language had no step yet
        chosen = ema_reselect(self.ema, lang, current, selection=setting(self.dynamic.selection),
                              keep_ratio=search.keep_ratio, top_k=search.top_k, threshold=self.dynamic.score_threshold,
                              min_heads_per_layer=search.min_heads_per_layer, units=self.units)  # fmt: skip
        return chosen.unit_mask, chosen.scores

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])


class LearnedRule:
    """Dynamic rule ``learned``: per-language hard-concrete gate logits trained with the model,
    with a penalty pulling the expected share of open gates to ``masks.keep_ratio``; the
    training forward pass uses the sampled gates, the mask the deterministic ones
    ([HardConcreteGates][subnets.masks.dynamic.HardConcreteGates])."""

    track_gates = False
    supports_episodes = False  # its penalty and gate optimizer belong to a single-batch step
    supports_mixed_batches = False

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
    ([subnets.masks.controls][])."""

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
    the rule (``dynamic.rule``: [EMARule][subnets.methods.dynamic.EMARule],
    [LearnedRule][subnets.methods.dynamic.LearnedRule], the control
    [RandomRule][subnets.methods.dynamic.RandomRule], or any object with their methods passed as ``rule``; its
    ``bind`` receives the languages, the gate shape, the device, ``seed=``, the run seed, and ``units=``, the
    kinds of unit in the gate columns). A coordinate that re-enters a language's subnetwork continues from the
    optimizer state it had when it left ([MaskedOptimizer][subnets.optim.masked.MaskedOptimizer]: frozen, not
    advanced). The mask after every update and the number of units that changed are kept per language and
    written, with figures, to ``<run>/masks/`` at the end of training.

    Args:
        search: the ``masks.*`` settings.
        dynamic: the ``dynamic.*`` settings.
        apply: ``forward``, ``gradient`` or ``both``, as for static masks.
        rule: a rule object (default: ``RULES[dynamic.rule]``).
        control: a transform of the masks found, as for static masks
            ([RandomControl][subnets.methods.subnetworks.RandomControl]).
    """

    def __init__(self, search: Any, dynamic: Any, apply: str = "gradient", rule: Any = None,
                 control: RandomControl | None = None):  # fmt: skip
        super().__init__(search, apply, control)
        self.dynamic = dynamic
        name = setting(dynamic.rule)
        if rule is None and name not in RULES:
            raise ValueError(f"dynamic.rule: unknown rule {name!r}; available: {', '.join(RULES)}")
        self.rule = rule if rule is not None else RULES[name](search, dynamic)
        self.supports_episodes = self.rule.supports_episodes
        self.supports_mixed_batches = self.rule.supports_mixed_batches
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
            self.set_masks(self.found(static_masks(model, self.search, sources, self.batcher, outputs)))
            self.write_summary(outputs)
            self.check_languages(sources.train)
            self.rule.start_from(self.masks)
        else:
            masks = SubnetworkSet.for_model(model)
            for lang in sources.train:
                masks[lang] = Subnetwork(torch.ones(model.gates.shape, dtype=torch.bool))
            self.set_masks(masks)
        self._record(0, {lang: 0 for lang in self.masks})

    def settings(self) -> dict[str, Any]:
        out = {**super().settings(), "update_every": int(self.dynamic.update_every)}
        return (
            out
            if self.control is not None
            else {**out, "rule": "dynamic", "ema_decay": float(self.dynamic.decay)}
        )

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
        self.set_masks(self.found(masks))
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
