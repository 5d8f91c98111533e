"""Meta-learning methods: MAML episodes over languages, alone or with subnetworks.

Each outer step samples ``meta.languages_per_episode`` distinct languages (by the run's
temperature sampling) and, for each, ``meta.support_size`` support and ``meta.query_size``
query sentences from its training data (disjoint). In ``maml_static`` and ``maml_dynamic``
language ``l``'s subnetwork applies in its inner steps and its query loss, per
``method.apply``: forward gates (``forward``, ``both``) and masked inner updates and masked
meta-gradients (``gradient``, ``both``); ``maml_dynamic`` tracks each language's importance
from the gate gradients of its query loss (rule ``ema``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from subnets.meta.maml import MAML, Task
from subnets.methods.base import Method, setting
from subnets.methods.subnetworks import DynamicSubnetworks, StaticSubnetworks
from subnets.training import StepResult

if TYPE_CHECKING:
    from subnets.experiment import Experiment


class MetaTraining:
    """Mixin: the outer step is a MAML episode instead of one batch."""

    maml: MAML

    def attach(self, experiment: Experiment) -> None:
        super().attach(experiment)
        meta = experiment.cfg.meta
        encoder = {name for name, _ in experiment.model.encoder_parameters()}
        self.maml = MAML(
            experiment.model,
            inner_steps=meta.inner_steps,
            inner_lr={"encoder": meta.inner_lr_encoder, "head": meta.inner_lr_head},
            group_of=lambda name: "encoder" if name in encoder else "head",
            first_order=meta.first_order,
            learn_inner_lr=meta.learn_inner_lr,
            inner_clip_norm=meta.inner_clip_norm,
        ).to(experiment.device)
        self._meta = meta

    def parameter_groups(self) -> list[dict]:
        if not self._meta.learn_inner_lr:
            return []
        names = [f"maml.log_inner_lr.{g}" for g in self.maml.log_inner_lr]
        return [{"params": list(self.maml.log_inner_lr.values()), "names": names, "lr": self._meta.inner_lr_lr,
                 "weight_decay": 0.0, "name": "inner_lr"}]  # fmt: skip

    def episode_languages(self, experiment: Experiment) -> list[str]:
        """Distinct languages drawn by the run's language sampling."""
        count = min(self._meta.languages_per_episode, len(experiment.train_data))
        chosen: list[str] = []
        while len(chosen) < count:
            lang = experiment.sampler.next_language()
            if lang not in chosen:
                chosen.append(lang)
        return chosen

    def step(self, experiment: Experiment) -> StepResult:
        meta, tasks = self._meta, []
        for lang in self.episode_languages(experiment):
            # Data parallelism: every process adapts on the same support batch and takes its
            # share of the query batch, so the averaged meta-gradient is the whole episode's.
            world = experiment.parallel.world_size
            indices = experiment.sampler.next_batch(lang, meta.support_size + meta.query_size * world)
            split = min(meta.support_size, max(1, len(indices) // 2))
            query = experiment.parallel.shard(indices[split:])
            tasks.append(Task(
                support=experiment.batch(lang, indices[:split]), query=experiment.batch(lang, query),
                name=lang, gates=self.head_gates(lang), update_mask=self.update_mask(lang),
                track_gates=self.track_gates(lang),
            ))  # fmt: skip
        result = self.maml.meta_step(
            tasks,
            experiment.optimizer,
            clip_norm=experiment.cfg.train.clip_norm,
            scheduler=experiment.scheduler,
            parallel=experiment.parallel,
        )
        for lang, gate_grad in result.gate_grads.items():
            self.record_gate_grad(lang, gate_grad)
        losses = {"query": result.loss, "support": result.support_loss}
        for group, log_lr in self.maml.log_inner_lr.items():
            losses[f"inner_lr_{group}"] = float(log_lr.detach().exp())
        return StepResult(result.loss, losses, result.grad_norm, result.words, language=tasks[0].name,
                          skipped=result.skipped)  # fmt: skip

    def record_gate_grad(self, lang: str, gate_grad: torch.Tensor) -> None:
        """Dynamic methods fold gate gradients into their importance; others ignore them."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "maml": self.maml.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.maml.load_state_dict(state["maml"])


class MetaLearning(MetaTraining, Method):
    """MAML over languages without subnetworks (``+method=maml``)."""

    name = "maml"


class MetaStatic(MetaTraining, StaticSubnetworks):
    """MAML with static subnetworks in the inner steps and query losses (``+method=maml_static``)."""

    name = "maml_static"


class MetaDynamic(MetaTraining, DynamicSubnetworks):
    """MAML with dynamic subnetworks tracked from the query losses' gate gradients
    (``+method=maml_dynamic``; rule ``ema``)."""

    name = "maml_dynamic"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if setting(cfg.dynamic.rule) != "ema":
            raise ValueError("maml_dynamic tracks importance from gate gradients: set dynamic.rule=ema")

    def record_gate_grad(self, lang: str, gate_grad: torch.Tensor) -> None:
        DynamicSubnetworks.record_gate_grad(self, lang, gate_grad)
