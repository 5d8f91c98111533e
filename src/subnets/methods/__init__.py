"""Training methods: a mask policy combined with a step strategy ([subnets.methods.base][]).

Policies: [NoMasks][subnets.methods.NoMasks] (the baseline),
[StaticMasks][subnets.methods.StaticMasks] ([static][subnets.methods.static]),
[DynamicMasks][subnets.methods.DynamicMasks] with its rules ([dynamic][subnets.methods.dynamic]), the
random-mask control [random_masks][subnets.methods.random_masks] (a
[RandomControl][subnets.methods.RandomControl] on the static masks); all but the baseline are
[SubnetworkPolicy][subnets.methods.SubnetworkPolicy] ([subnetworks][subnets.methods.subnetworks]). Strategies:
[BatchStep][subnets.methods.BatchStep], [MAMLEpisodes][subnets.methods.MAMLEpisodes]. The methods reviewers
compare with: [LoraPolicy][subnets.methods.LoraPolicy] and
[LanguageLora][subnets.methods.LanguageLora], [ShiraPolicy][subnets.methods.ShiraPolicy]
([adapters][subnets.methods.adapters], peft),
[LotteryTicketSFT][subnets.methods.LotteryTicketSFT] ([sft][subnets.methods.sft])."""

from subnets.methods.adapters import LanguageLora, LoraPolicy, ShiraPolicy
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
    "Outputs", "RandomControl", "RandomRule", "ShiraPolicy", "SourceLanguages", "StaticMasks", "StepStrategy", "SubnetworkPolicy",
    "TrainingBatches", "random_masks", "search_masks", "static_masks",
]  # fmt: skip
