"""The settings of subnetworks on a Hugging Face model
([SubnetworkConfig][subnets.hf.config.SubnetworkConfig]), named and defaulted as the runner's ``masks.*``
and ``method.apply`` settings where they mean the same thing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from subnets.masks.selection import Units, select_keep_ratio, select_top_k

CHOICES = {
    "units": ("heads", "neurons", "both"),
    "rule": ("static", "dynamic", "random"),
    "importance": ("head", "fisher", "activation"),
    "apply": ("forward", "gradient", "both"),
    "target_policy": ("full", "error", "support", "nearest"),
    "train": ("all", "subnetwork"),
}
# config.json of sets saved before the runner's names were adopted: old name -> new, old value -> new
RENAMED = {"min_per_layer": "min_heads_per_layer"}
REVALUED = {"importance": {"gradient": "head"}}


@dataclass
class SubnetworkConfig:
    """What a language's subnetwork is made of, how it is found and what it restricts.

    Args:
        units: the gated units: ``heads``, ``neurons`` (feed-forward) or ``both``.
        keep_ratio: share of each kind of unit a language keeps (ignored with ``top_k``).
        top_k: keep this many units in all (one kind of unit only).
        min_heads_per_layer: units (of each kind, heads or neurons) every layer keeps at least
            (the runner's ``masks.min_heads_per_layer``).
        rule: ``static`` (masks found once, [find_subnetworks][subnets.hf.find_subnetworks]), ``dynamic``
            (re-selected during training from an exponential moving average of ``|dL/dgate|``
            every ``update_every`` optimizer steps) or ``random`` (random masks with the same
            counts per layer: the control).
        importance: the estimator that scores units (the runner's ``masks.importance``): ``head``
            (``|dL/dgate|`` of each unit, head or neuron, Michel et al. 2019), ``fisher``
            (diagonal Fisher information summed over the weights a unit owns, from single examples)
            or ``activation`` (language-specific feed-forward neurons by the entropy of their
            activation probabilities over the languages, LAPE: [subnets.masks.activation][];
            ``units='neurons'`` only).
        activation_quantile: with ``importance='activation'``, the quantile of all activation
            probabilities a neuron's must exceed to count as the language's (the runner's
            ``masks.activation_quantile``).
        apply: what a language's mask restricts (the runner's ``method.apply``): ``forward`` (units
            outside it are gated off in the forward pass), ``gradient`` (the whole model runs; the
            update leaves the weights of units outside it bit-identical, optimizer moments included)
            or ``both``. The default, ``gradient``, is the runner's: a subnetwork then decides what a
            language's steps may change and nothing else, so the wrapped model computes what the
            pretrained model computes until training changes it, every language (one without a
            subnetwork too) runs through the same units, and a set made by either path means the
            same thing in the other; ``both`` or ``forward`` also gate the forward pass.
        target_policy: what a language without a subnetwork gets (the runner's
            ``masks.target_policy``): the whole model (``full``), a refusal (``error``, the
            wrapper's own). The runner's ``support`` and ``nearest`` estimate an unseen language's
            mask from its support sentences at evaluation; the wrapper keeps them in the settings
            of a set exported from a run but refuses such a language, with the reason: find its
            subnetwork from its examples first (``find_subnetworks``).
        train: what trains (the runner's ``masks.train``): every parameter (``all``; a language's
            steps update its subnetwork and the shared rest), or the subnetworks alone
            (``subnetwork``: the weights the languages' units own and the task head outside
            ``model.base_model``; embeddings, norms, biases and the output embeddings frozen; gradients
            and optimizer state for the subnetworks' values only,
            [train_subnetworks_only][subnets.masks.compact.train_subnetworks_only]). With ``subnetwork``,
            find or set the masks before the optimizer is built (the Trainer builds it at ``train()``).
        ema_decay: the decay of the dynamic rule's moving average.
        update_every: optimizer steps between re-selections (dynamic rule).
        seed: the random rule's seed (masks depend on the seed and the language only).
    """

    units: str = "heads"
    keep_ratio: float = 0.5
    top_k: int | None = None
    min_heads_per_layer: int = 1
    rule: str = "static"
    importance: str = "head"
    apply: str = "gradient"
    target_policy: str = "full"
    activation_quantile: float = 0.95
    train: str = "all"
    ema_decay: float = 0.9
    update_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"SubnetworkConfig.{name}={getattr(self, name)!r}: expected one of {', '.join(choices)}"
                )
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"SubnetworkConfig.keep_ratio={self.keep_ratio}: expected a share in (0, 1]")
        if self.top_k is not None and (self.top_k < 1 or self.units == "both"):
            raise ValueError(f"SubnetworkConfig.top_k={self.top_k}: expected a positive count of one kind of unit "
                             "(with units='both' use keep_ratio)")  # fmt: skip
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"SubnetworkConfig.ema_decay={self.ema_decay}: expected a value in [0, 1)")
        if self.importance == "activation" and self.units != "neurons":
            raise ValueError(f"SubnetworkConfig.importance='activation' with units={self.units!r}: activation "
                             "probabilities score feed-forward neurons, not heads; use units='neurons'")  # fmt: skip
        if self.train == "subnetwork" and self.apply == "forward":
            raise ValueError("SubnetworkConfig.train='subnetwork' with apply='forward': forward gating alone updates "
                             "every parameter; use apply='gradient' or 'both'")  # fmt: skip
        if self.update_every < 1 or self.min_heads_per_layer < 0:
            raise ValueError("SubnetworkConfig.update_every must be >= 1 and min_heads_per_layer >= 0")

    def select(self, scores: torch.Tensor, units: Units) -> torch.Tensor:
        """The mask these settings keep from unit ``scores``: ``top_k`` units, else ``keep_ratio``
        of each kind, at least ``min_heads_per_layer`` per layer."""
        if self.top_k is not None:
            return select_top_k(scores, self.top_k, self.min_heads_per_layer, units)
        return select_keep_ratio(scores, self.keep_ratio, self.min_heads_per_layer, units)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "subnetwork config") -> SubnetworkConfig:
        """The settings in ``values`` (a set's ``config.json``); the names and values of sets saved
        before the runner's names were adopted (``min_per_layer``, ``importance='gradient'``) are read
        as their new ones."""
        values = {RENAMED.get(name, name): value for name, value in values.items()}
        values = {name: REVALUED.get(name, {}).get(value, value) for name, value in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**values)
