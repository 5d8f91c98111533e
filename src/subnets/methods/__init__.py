"""Training methods: a mask policy combined with a step strategy (:mod:`subnets.methods.base`)."""

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
from subnets.methods.episodes import MAMLEpisodes
from subnets.methods.policies import (
    DynamicMasks,
    EMARule,
    LearnedRule,
    RandomMasks,
    RandomRule,
    StaticMasks,
    SubnetworkPolicy,
    search_masks,
    static_masks,
)

__all__ = [
    "BatchStep", "DynamicMasks", "EMARule", "LearnedRule", "MAMLEpisodes", "MaskPolicy", "Method", "NoMasks",
    "Outputs", "RandomMasks", "RandomRule", "SourceLanguages", "StaticMasks", "StepStrategy", "SubnetworkPolicy", "TrainingBatches",
    "search_masks", "static_masks",
]  # fmt: skip
