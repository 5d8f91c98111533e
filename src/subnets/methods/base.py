"""Training methods: the small decisions in which the methods differ, owned by one object.

A method answers, for a step of language ``l``: which head gates the forward pass uses, which
coordinates the update may change, what happens after the backward pass, and how one outer step
is computed. It owns its state (masks, importance averages, ...) and saves it with
:meth:`Method.state_dict`, so the training loop, the evaluation and checkpoints are the same
for every method. It also answers the test-time question: which gates a language is evaluated
with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from subnets.data.batching import Batch
from subnets.training import StepResult, training_step

if TYPE_CHECKING:
    from subnets.data.dataset import LanguageData
    from subnets.experiment import Experiment


def setting(value: Any) -> Any:
    """A config value as plain Python (structured configs hold enum members for choices)."""
    return getattr(value, "value", value)


class Method:
    """Ordinary multilingual fine-tuning with language-homogeneous batches (``baseline``)."""

    name = "baseline"

    needs_support = False  # whether unseen languages need support sentences (test-time policy)

    def __init__(self, cfg: Any = None):
        self.cfg = cfg  # the run's config

    def attach(self, experiment: Experiment) -> None:
        """Bind to the experiment's model and data before a resume restores :meth:`state_dict`
        (cheap: build the state objects that checkpoints fill in)."""

    def setup(self, experiment: Experiment) -> None:
        """Prepare state before training (called after a resume has restored :meth:`state_dict`)."""

    def on_train_end(self, experiment: Experiment) -> None:
        """Called once when training reaches its last step (before the final evaluation)."""

    def parameter_groups(self) -> list[dict]:
        """Extra parameter groups for the outer optimizer (e.g. learned inner learning rates)."""
        return []

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module
    ) -> torch.optim.Optimizer:
        """The optimizer the runner steps (masked methods wrap it to make masked updates exact)."""
        return optimizer

    def head_gates(self, lang: str) -> torch.Tensor | None:
        """Forward head gates ``[layers, heads]`` for a step of ``lang`` (None: all heads)."""
        return None

    def update_mask(self, lang: str) -> dict[str, torch.Tensor] | None:
        """Coordinates a step of ``lang`` may update (None: all)."""
        return None

    def track_gates(self, lang: str) -> bool:
        """Whether a step of ``lang`` needs ``dL/dgate`` (dynamic importance)."""
        return False

    def after_step(self, experiment: Experiment, result: StepResult) -> dict[str, float]:
        """React to a finished step (e.g. update importance); returns values to log."""
        return {}

    def step(self, experiment: Experiment) -> StepResult:
        """One outer step of training: draw a language and a batch, and train on it."""
        lang = experiment.sampler.next_language()
        return self.train_step(experiment, lang, experiment.batch(lang, experiment.next_indices(lang)))

    def train_step(self, experiment: Experiment, lang: str, batch: Batch) -> StepResult:
        """One optimisation step on a batch of ``lang``."""
        return training_step(
            experiment.model,
            batch,
            experiment.optimizer,
            gates=self.head_gates(lang),
            track_gates=self.track_gates(lang),
            update_mask=self.update_mask(lang),
            clip_norm=experiment.cfg.train.clip_norm,
            scheduler=experiment.scheduler,
            parallel=experiment.parallel,
        )

    def eval_gates(self, lang: str) -> torch.Tensor | None:
        """Head gates for evaluating ``lang`` (training languages: their subnetwork; others:
        the test-time policy). The baseline uses every head."""
        return None

    def adaptation(
        self, experiment: Experiment, model: torch.nn.Module, lang: str, support: LanguageData
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """Head gates and update mask for adapting ``model`` to an unseen language from its
        ``support`` sentences (the few-shot protocol; the test-time policy). Baseline: none."""
        return None, None

    def prepare_evaluation(self, experiment: Experiment) -> None:
        """Called before each evaluation round (e.g. to estimate unseen languages' masks)."""

    def summary(self) -> dict[str, Any]:
        """Method-specific figures for results.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_method(cfg: Any) -> Method:
    """The method named by ``cfg.method.name``."""
    from subnets.methods.meta import MetaDynamic, MetaLearning, MetaStatic
    from subnets.methods.subnetworks import DynamicSubnetworks, StaticSubnetworks

    methods: dict[str, type[Method]] = {
        "baseline": Method,
        "static": StaticSubnetworks,
        "dynamic": DynamicSubnetworks,
        "maml": MetaLearning,
        "maml_static": MetaStatic,
        "maml_dynamic": MetaDynamic,
    }
    name = str(setting(cfg.method.name))
    if name not in methods:
        raise ValueError(f"method.name: unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name](cfg)
