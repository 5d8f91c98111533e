"""A training method = a mask policy + a step strategy.

The six methods differ in two small, independent decisions, each answered by one object:

* the **mask policy** ([MaskPolicy][subnets.methods.base.MaskPolicy]): which head gates a step of language
  ``l`` runs with, which coordinates its update may change, what it learns from a finished step (e.g.
  importance from ``dL/dgate``), and which subnetwork an unseen language is evaluated and
  adapted with. Policies: [NoMasks][subnets.methods.NoMasks],
  [StaticMasks][subnets.methods.StaticMasks], [DynamicMasks][subnets.methods.DynamicMasks];
* the **step strategy** ([StepStrategy][subnets.methods.base.StepStrategy]): how one outer step is computed
  from the training languages (one batch; a MAML episode over several languages).

``maml_dynamic`` is the MAML episode with the dynamic (EMA) policy; nothing else. A user's own
method is a policy or a strategy of their own, named by ``_target_`` in a method config::

    method:
      name: random_heads
      policy:
        _target_: my_module.RandomHeads
        per_layer: 2

(``examples/custom_method.py`` is this method in full.)

Hooks receive what they use (the model, the batch source, the language, the step), never the
whole run. A policy's and a strategy's state (masks, importance averages, learned rates) is
saved with the checkpoint through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnets.data.dataset import Batcher, LanguageData
from subnets.masks.core import union_update_mask
from subnets.parallel.distributed import DataParallel
from subnets.training.update import StepResult, training_step


@dataclass
class Outputs:
    """Where a policy writes its files (``folder``, the run folder) and how it logs
    (``log(record, images=None)``: metrics.jsonl and W&B)."""

    folder: Path
    log: Callable[..., None] = lambda record, images=None: None


@dataclass
class SourceLanguages:
    """What a policy may use before training ([MaskPolicy.prepare][subnets.methods.base.MaskPolicy.prepare]).

    Attributes:
        train: training data per source language.
        dev: the source languages' dev splits (for iterative pruning), where they exist.
        dev_metric: ``(model, data, gates) -> float``: the development metric (LAS, or UPOS
            accuracy for tagging) of ``model`` on ``data`` under head ``gates``.
        make_optimizer: ``model -> optimizer`` for fine-tuned copies (the run's optimizer settings).
        batch_size: the run's training batch size.
        tokenizer: the run's tokenizer (for text a policy reads itself).
    """

    train: Mapping[str, LanguageData]
    dev: Mapping[str, LanguageData] = field(default_factory=dict)
    dev_metric: Callable[[nn.Module, LanguageData, torch.Tensor | None], float] | None = None
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    batch_size: int = 32
    tokenizer: Any = None


class MaskPolicy:
    """Which units a language uses and updates. This base class uses and updates everything
    (the baseline); subclasses override what they decide.

    Call order: [bind][subnets.methods.base.MaskPolicy.bind] (before a resume restores ``state_dict``),
    [prepare][subnets.methods.base.MaskPolicy.prepare] (before training, after the resume), then per step
    [gates][subnets.methods.base.MaskPolicy.gates],
    [update_mask][subnets.methods.base.MaskPolicy.update_mask],
    [track_gates][subnets.methods.base.MaskPolicy.track_gates],
    [extra_loss][subnets.methods.base.MaskPolicy.extra_loss] before and
    [after_step][subnets.methods.base.MaskPolicy.after_step] after the update;
    [on_train_end][subnets.methods.base.MaskPolicy.on_train_end] once;
    [prepare_evaluation][subnets.methods.base.MaskPolicy.prepare_evaluation] before each evaluation round.
    """

    needs_support = False  # whether unseen languages need support sentences (test-time policy)
    supports_episodes = True  # whether it can run inside a MAML episode
    supports_mixed_batches = True  # whether a step may mix languages (train.batches=mixed)
    schedule_restart: int | None = None  # a step at which the learning-rate schedule starts again
    uses_masks_path = False  # whether it reads a saved mask set (masks.path); else that setting is refused
    uses_after_steps = False  # whether it can search its masks during training (masks.after_steps)
    has_subnetworks = False  # language subnetworks that can train alone (masks.train=subnetwork, bf16_base)
    supports_sharding = False  # whether it runs on an FSDP2-sharded model (it neither copies nor wraps it)

    def bind(self, model: nn.Module, batcher: Batcher, languages: list[str]) -> None:
        """Cheap set-up on the model, its batches and the training ``languages`` (build the
        state objects a checkpoint fills in)."""

    def prepare(self, model: nn.Module, sources: SourceLanguages, outputs: Outputs) -> None:
        """Prepare before training (e.g. find static masks); not repeated after a resume."""

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer the runner steps (masked policies wrap it to make masked updates exact)."""
        return optimizer

    def parameter_groups(self) -> list[dict]:
        """Extra parameter groups for the outer optimizer."""
        return []

    def gates(self, lang: str) -> torch.Tensor | None:
        """Forward unit gates ``[layers, units]`` for a training step of ``lang`` (None: all units)."""
        return None

    def update_mask(self, lang: str) -> dict[str, torch.Tensor] | None:
        """Coordinates a step of ``lang`` may update, by parameter name (None: all)."""
        return None

    def union_update_mask(self, languages: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """What a step of sentences of several ``languages`` may update: a coordinate any of
        their update masks lets move ([union_update_mask][subnets.masks.core.union_update_mask]; None: all,
        where a language's mask is None)."""
        masks = [self.update_mask(lang) for lang in languages]
        cache = self.__dict__.setdefault("_unions", {})
        key = tuple(id(m) for m in masks)
        if key not in cache or any(a is not b for a, b in zip(cache[key][0], masks)):
            if len(cache) > 64:
                cache.clear()
            cache[key] = (masks, union_update_mask(masks))  # holds the masks: their ids are not reused
        return cache[key][1]

    def updated_parameters(self, model: nn.Module, lang: str) -> int:
        """How many parameters a step of ``lang`` may change: the trainable coordinates its update
        mask lets move (all trainable ones without a mask)."""
        mask = self.update_mask(lang)
        return sum(int(mask[name].sum()) if mask is not None and name in mask else p.numel()
                   for name, p in model.named_parameters() if p.requires_grad)  # fmt: skip

    def parameter_budget(self, model: nn.Module, languages: Sequence[str]) -> dict[str, Any]:
        """Trainable parameters and those each training language's steps may update (results.json)."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "trainable": trainable,
            "updated": {lang: self.updated_parameters(model, lang) for lang in languages},
        }

    def track_gates(self, lang: str) -> bool:
        """Whether a step of ``lang`` needs ``dL/dgate`` (returned in ``StepResult.gate_grads``)."""
        return False

    def extra_loss(self, lang: str) -> Callable[[], torch.Tensor] | None:
        """A term added to the loss of a step of ``lang`` (e.g. a sparsity penalty)."""
        return None

    def extra_parameters(self) -> list[torch.Tensor]:
        """Trainable tensors outside the optimizer whose gradients are averaged over processes."""
        return []

    def after_step(self, step: int, result: StepResult) -> dict[str, float]:
        """React to finished step number ``step`` (e.g. update importance); returns values to log."""
        return {}

    def on_train_end(self, outputs: Outputs) -> None:
        """Called once when training reaches its last step."""

    def prepare_evaluation(self, model: nn.Module, support: Mapping[str, LanguageData]) -> None:
        """Called before each evaluation round with the unseen languages' support sentences."""

    def eval_gates(self, lang: str) -> torch.Tensor | None:
        """Head gates for evaluating ``lang`` (a source language's subnetwork, or the test-time
        policy's for an unseen one)."""
        return None

    def adaptation(
        self, model: nn.Module, lang: str, support: LanguageData
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """Head gates and update mask for adapting ``model`` to unseen ``lang`` from its
        ``support`` sentences (the few-shot protocol)."""
        return None, None

    def summary(self) -> dict[str, Any]:
        """Policy-specific figures for results.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class NoMasks(MaskPolicy):
    """Every language uses and updates every unit (the baseline)."""

    supports_sharding = True


class TrainingBatches:
    """The batches a step strategy draws: a language by the run's temperature sampling, then
    sentences of it (every process draws the same ones,
    [LanguageSampler][subnets.data.sampling.LanguageSampler])."""

    def __init__(self, sampler, data: Mapping[str, LanguageData], batcher: Batcher, parallel: DataParallel,
                 mixed: bool = False):  # fmt: skip
        self.sampler, self.data, self.batcher, self.parallel = sampler, data, batcher, parallel
        self.mixed = mixed  # train.batches=mixed: next_parts draws each sentence's language

    def next_language(self) -> str:
        return self.sampler.next_language()

    def draw(self, lang: str, size: int) -> list[int]:
        """The next ``size`` sentence indices of ``lang`` (the same on every process)."""
        return self.sampler.next_batch(lang, size)

    def batch(self, lang: str, indices: list[int]):
        """The batch of ``lang``'s sentences at ``indices``."""
        return self.batcher.of(self.data[lang], indices)

    def next_batch(self, lang: str, size: int):
        """This process's share of the next ``size x world_size`` sentences of ``lang``."""
        return self.batch(lang, self.parallel.shard(self.draw(lang, size * self.parallel.world_size)))

    def next_parts(self, size: int) -> tuple[list, list[str]]:
        """The next training batch as parts of one language each, and the languages drawn (in
        the order of their first draw, the same on every process). Grouped: one language, one
        part. Mixed: the language of each of the ``size x world_size`` sentences is drawn by the
        temperature sampling, and each language's sentences are shared out among the processes
        (a process may hold no sentence of a rare one)."""
        if not self.mixed:
            lang = self.next_language()
            return [self.next_batch(lang, size)], [lang]
        drawn = [self.next_language() for _ in range(size * self.parallel.world_size)]
        languages = list(dict.fromkeys(drawn))
        parts = []
        for lang in languages:
            mine = self.parallel.shard(self.draw(lang, drawn.count(lang)))
            if mine:
                parts.append(self.batch(lang, mine))
        return parts, languages


class StepStrategy:
    """How one outer training step is computed (see [BatchStep][subnets.methods.base.BatchStep], and
    [MAMLEpisodes][subnets.methods.episodes.MAMLEpisodes])."""

    # whether its steps run on functional copies of whole parameters (torch.func: MAML's inner loop),
    # which neither sharded parameters nor the subnetworks' own values are
    functional = False
    supports_mixed_batches = True  # whether a batch may mix languages (train.batches=mixed)

    def bind(self, model: nn.Module) -> None:
        """Cheap set-up on the model (before a resume restores ``state_dict``)."""

    def check_policy(self, policy: MaskPolicy) -> None:
        """Raise if this strategy cannot run ``policy``."""

    def parameter_groups(self) -> list[dict]:
        """Extra parameter groups for the outer optimizer (e.g. learned inner learning rates)."""
        return []

    def step(
        self,
        model: nn.Module,
        batches: TrainingBatches,
        optimizer: torch.optim.Optimizer,
        policy: MaskPolicy,
        *,
        batch_size: int,
        clip_norm: float | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        parallel: DataParallel | None = None,
    ) -> StepResult:
        """One outer step: draw data from ``batches``, train ``model`` through ``optimizer``
        under ``policy``'s gates and masks; ``batch_size`` is the run's (sentences per process)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class BatchStep(StepStrategy):
    """One step = one batch drawn by the run's language sampling: of one language
    (``train.batches=grouped``) or mixing languages (``mixed``: each language's sentences run
    through its own gates; the update is the union of their update masks)."""

    def step(
        self, model, batches, optimizer, policy, *, batch_size, clip_norm=None, scheduler=None, parallel=None
    ):
        parts, languages = batches.next_parts(batch_size)
        if len(languages) == 1:
            return self.train_on(
                parts[0],
                model,
                optimizer,
                policy,
                clip_norm=clip_norm,
                scheduler=scheduler,
                parallel=parallel,
            )
        return training_step(  # a mixed batch: each language's sentences through its own subnetwork
            model,
            parts,
            optimizer,
            gates={lang: policy.gates(lang) for lang in languages},
            track_gates=any(policy.track_gates(lang) for lang in languages),
            update_mask=policy.union_update_mask(languages),
            clip_norm=clip_norm,
            scheduler=scheduler,
            parallel=parallel,
            also_average=policy.extra_parameters(),
        )

    def train_on(
        self, batch, model, optimizer, policy, *, clip_norm=None, scheduler=None, parallel=None
    ) -> StepResult:
        """One step on ``batch`` (of language ``batch.lang``) under ``policy``."""
        lang = batch.lang
        return training_step(
            model,
            batch,
            optimizer,
            gates=policy.gates(lang),
            track_gates=policy.track_gates(lang),
            update_mask=policy.update_mask(lang),
            clip_norm=clip_norm,
            scheduler=scheduler,
            extra_loss=policy.extra_loss(lang),
            parallel=parallel,
            also_average=policy.extra_parameters(),
        )


@dataclass
class Method:
    """A named pair of a [MaskPolicy][subnets.methods.base.MaskPolicy] and a
    [StepStrategy][subnets.methods.base.StepStrategy]."""

    name: str
    policy: MaskPolicy = field(default_factory=NoMasks)
    strategy: StepStrategy = field(default_factory=BatchStep)

    def __post_init__(self):
        self.strategy.check_policy(self.policy)

    def state_dict(self) -> dict[str, Any]:
        """The policy's and the strategy's state in one dictionary (their keys must differ)."""
        policy, strategy = self.policy.state_dict(), self.strategy.state_dict()
        shared = set(policy) & set(strategy)
        if shared:
            raise ValueError(f"the policy and the step strategy both save state under {sorted(shared)}")
        return {**policy, **strategy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state)
        self.strategy.load_state_dict(state)
