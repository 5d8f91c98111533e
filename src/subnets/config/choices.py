"""The choices of the runner's settings: every enumeration the schema
([subnets.config.schema][]) types a setting with."""

from __future__ import annotations

from enum import Enum


class DataSource(str, Enum):
    synthetic = "synthetic"
    ud = "ud"


OnError = Enum("OnError", {"raise": "raise", "skip": "skip"}, type=str)  # 'raise' is a keyword


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Schedule(str, Enum):
    linear = "linear"
    constant = "constant"


class Batches(str, Enum):
    grouped = "grouped"  # a language drawn per batch (temperature sampling), then its sentences
    mixed = (
        "mixed"  # each sentence's language drawn on its own: every sentence through its language's subnetwork
    )


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast, fp32 weights and optimizer (with fsdp: layers gathered in bf16)
    # the transformer's weights stored in bf16 and frozen (masks.train=subnetwork only), under autocast;
    # the subnetworks' values (an fp32 master copy), the task head and the optimizer state in fp32
    bf16_base = "bf16_base"
    # weights, activations and optimizer state in float64: slower, for checks of numerics
    fp64 = "fp64"


class Parallel(str, Enum):  # under torchrun (subnets.parallel.distributed, subnets.parallel.sharding)
    ddp = "ddp"  # every process holds the whole model; gradients averaged over processes
    fsdp = "fsdp"  # FSDP2: each layer, then the rest, sharded (parameters, gradients, optimizer state)


class ApplyMode(str, Enum):
    forward = "forward"  # heads outside the subnetwork are gated off in the forward pass
    gradient = "gradient"  # the full model runs; only the subnetwork is updated
    both = "both"


class Importance(str, Enum):
    head = "head"  # Michel et al. 2019: |dL/dgate| of each unit (head or neuron)
    fisher = "fisher"  # diagonal Fisher information summed over each unit's coordinates
    # neurons only: LAPE (Tang et al. 2024), the entropy over languages of how often a neuron is active
    activation = "activation"


class UnitKind(str, Enum):
    heads = "heads"  # attention heads
    neurons = "neurons"  # feed-forward intermediate units
    both = "both"  # heads and neurons, each kind selected on its own


class TrainedParameters(str, Enum):
    all = "all"  # every parameter trains; a language's step updates its subnetwork and the shared rest
    subnetwork = "subnetwork"  # only the units' weights and the task head (subnets.masks.compact)


class Selection(str, Enum):
    iterative = "iterative"
    keep_ratio = "keep_ratio"
    top_k = "top_k"


ParamScope = Enum("ParamScope", {"tensor": "tensor", "global": "global"}, type=str)  # 'global' is a keyword


class ParamMasks(str, Enum):
    none = "none"
    fisher = "fisher"


class DynamicRule(str, Enum):
    ema = "ema"  # exponential moving average of |dL/dgate| from the training steps
    learned = "learned"  # hard-concrete gate logits trained with the model
    random = "random"  # control: the selection applied to random scores, redrawn at every update


class DynamicInit(str, Enum):
    full = "full"
    static = "static"


class DynamicSelection(str, Enum):
    keep_ratio = "keep_ratio"
    top_k = "top_k"
    threshold = "threshold"
    same_size = "same_size"


class FewShotOptimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"  # plain SGD, as in Langedijk et al. (2022): +fewshot=langedijk


class TargetPolicy(str, Enum):
    full = "full"
    support = "support"
    nearest = "nearest"
