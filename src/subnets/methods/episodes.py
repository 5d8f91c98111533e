"""The MAML step strategy: each outer step is an episode of languages
([MAMLEpisodes][subnets.methods.episodes.MAMLEpisodes]).

Each outer step samples ``meta.languages_per_episode`` distinct languages (by the run's
temperature sampling) and, for each, ``meta.support_size`` support and ``meta.query_size``
query sentences from its training data (disjoint). With a subnetwork policy
(``maml_static``, ``maml_dynamic``), language ``l``'s subnetwork applies in its inner steps and
its query loss: forward gates (``forward``, ``both``) and masked inner updates and masked
meta-gradients (``gradient``, ``both``); a policy that tracks ``dL/dgate`` receives the gate
gradients of each language's query loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from subnets.meta.maml import MAML, MetaTask
from subnets.methods.base import MaskPolicy, StepStrategy, TrainingBatches
from subnets.training.update import StepResult


class MAMLEpisodes(StepStrategy):
    """One outer step = a MAML episode over languages ([MAML][subnets.meta.MAML]).

    Args:
        meta: the ``meta.*`` settings (``MetaConfig``).
    """

    functional = True
    supports_mixed_batches = False  # an episode draws a batch per language

    def __init__(self, meta: Any):
        self.meta = meta
        self.maml: MAML | None = None

    def bind(self, model: nn.Module) -> None:
        meta = self.meta
        encoder = {name for name, _ in model.encoder_parameters()}
        self.maml = MAML(
            model,
            inner_steps=meta.inner_steps,
            inner_lr={"encoder": meta.inner_lr_encoder, "head": meta.inner_lr_head},
            group_of=lambda name: "encoder" if name in encoder else "head",
            first_order=meta.first_order,
            learn_inner_lr=meta.learn_inner_lr,
            inner_clip_norm=meta.inner_clip_norm,
        ).to(next(model.parameters()).device)

    def check_policy(self, policy: MaskPolicy) -> None:
        if not policy.supports_episodes:
            raise ValueError(f"{type(policy).__name__} cannot run inside MAML episodes "
                             "(dynamic.rule=learned trains its gates in single-batch steps; use dynamic.rule=ema)")  # fmt: skip

    def parameter_groups(self) -> list[dict]:
        if not self.meta.learn_inner_lr:
            return []
        names = [f"maml.log_inner_lr.{g}" for g in self.maml.log_inner_lr]
        return [{"params": list(self.maml.log_inner_lr.values()), "names": names, "lr": self.meta.inner_lr_lr,
                 "weight_decay": 0.0, "name": "inner_lr"}]  # fmt: skip

    def episode_languages(self, batches: TrainingBatches) -> list[str]:
        """Distinct languages drawn by the run's language sampling."""
        count = min(self.meta.languages_per_episode, len(batches.data))
        chosen: list[str] = []
        while len(chosen) < count:
            lang = batches.next_language()
            if lang not in chosen:
                chosen.append(lang)
        return chosen

    def step(
        self, model, batches, optimizer, policy, *, batch_size, clip_norm=None, scheduler=None, parallel=None
    ):
        meta, tasks = self.meta, []
        world = batches.parallel.world_size
        for lang in self.episode_languages(batches):
            # Data parallelism: every process adapts on the same support batch and takes its
            # share of the query batch, so the averaged meta-gradient is the whole episode's.
            indices = batches.draw(lang, meta.support_size + meta.query_size * world)
            split = min(meta.support_size, max(1, len(indices) // 2))
            query = batches.parallel.shard(indices[split:])
            tasks.append(MetaTask(
                support=batches.batch(lang, indices[:split]), query=batches.batch(lang, query), name=lang,
                gates=policy.gates(lang), update_mask=policy.update_mask(lang), track_gates=policy.track_gates(lang),
            ))  # fmt: skip
        result = self.maml.meta_step(
            tasks, optimizer, clip_norm=clip_norm, scheduler=scheduler, parallel=parallel
        )
        losses = {"query": result.loss, "support": result.support_loss}
        for group, log_lr in self.maml.log_inner_lr.items():
            losses[f"inner_lr_{group}"] = float(log_lr.detach().exp())
        return StepResult(result.loss, losses, result.grad_norm, result.words, gate_grads=result.gate_grads,
                          language=tasks[0].name, skipped=result.skipped)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"maml": self.maml.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.maml.load_state_dict(state["maml"])
