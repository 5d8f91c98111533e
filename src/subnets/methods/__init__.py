"""Training methods: a mask policy combined with a step strategy (:mod:`subnets.methods.base`).

Policies: :class:`NoMasks` (the baseline), :class:`StaticMasks` (:mod:`~subnets.methods.static`),
:class:`DynamicMasks` with its rules (:mod:`~subnets.methods.dynamic`), the random-mask control
:func:`random_masks` (a :class:`RandomControl` on the static masks); all but the baseline are
:class:`SubnetworkPolicy` (:mod:`~subnets.methods.subnetworks`). Strategies: :class:`BatchStep`,
:class:`MAMLEpisodes`. The methods reviewers compare with: :class:`LoraPolicy` and
:class:`LanguageLora` (:mod:`~subnets.methods.adapters`, peft), :class:`LotteryTicketSFT`
(:mod:`~subnets.methods.sft`)."""

from subnets.methods.adapters import LanguageLora, LoraPolicy
from subnets.methods.base import (
    BatchStep,
    MaskPolicy,
    Method,
    NoMasks,
    Outputs,
    SourceLanguages,
    StepStrategy,
    TrainingBatches,
)
from subnets.methods.dynamic import DynamicMasks, EMARule, LearnedRule, RandomRule
from subnets.methods.episodes import MAMLEpisodes
from subnets.methods.sft import LotteryTicketSFT
from subnets.methods.static import StaticMasks, random_masks, search_masks, static_masks
from subnets.methods.subnetworks import RandomControl, SubnetworkPolicy

__all__ = [
    "BatchStep", "DynamicMasks", "EMARule", "LanguageLora", "LearnedRule", "LoraPolicy", "LotteryTicketSFT", "MAMLEpisodes", "MaskPolicy", "Method", "NoMasks",
    "Outputs", "RandomControl", "RandomRule", "SourceLanguages", "StaticMasks", "StepStrategy", "SubnetworkPolicy",
    "TrainingBatches", "random_masks", "search_masks", "static_masks",
]  # fmt: skip
