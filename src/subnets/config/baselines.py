"""The settings of the comparison methods (``lora.*``, ``shira.*``, ``sft.*``), part of the
runner's schema (``subnets.config.schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class AdapterPolicy(str, Enum):
    full = "full"  # no language adapter: the base model with the shared task head
    nearest = "nearest"  # the adapter of the typologically nearest source language (URIEL syntax)
    support = "support"  # the adapter with the lowest loss on the language's support sentences


class BudgetMatch(str, Enum):
    none = "none"  # lora.rank / shira.r / sft.k as given
    # as many parameters as a static subnetwork of the masks.* settings lets a language update
    # inside the gated units (the parameters its kept heads or neurons own)
    static = "static"


@dataclass
class LoraSettings:
    """LoRA (``+method=lora``) and one LoRA per source language (``+method=language_lora``),
    through peft: the encoder's weights frozen, low-rank updates of its projections trained."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # projections within a layer (paths as in the layout, e.g. attention.self.query); empty: the
    # layout's query, key, value and attention output projections
    targets: list[str] = field(default_factory=list)
    target_policy: AdapterPolicy = AdapterPolicy.full  # language_lora: the adapter of an unseen language
    match: BudgetMatch = BudgetMatch.none  # static: the rank whose adapter comes closest to that budget


class ShiraMask(str, Enum):
    random = "random"  # peft's random mask: r x (in + out) coordinates of each target, uniformly drawn


@dataclass
class ShiraSettings:
    """SHiRA, sparse high-rank adapters (``+method=shira``, Bhardwaj et al. 2024), through peft:
    the encoder's weights frozen, a fixed sparse set of coordinates of its projections trained."""

    # coordinates trained per target projection: r x (in + out), as many as a rank-r LoRA's (the
    # update itself is not limited to rank r)
    r: int = 8
    mask_type: ShiraMask = ShiraMask.random  # the mask's seed is the run's (seed)
    # projections within a layer (as lora.targets); empty: the layout's query, key, value and
    # attention output projections
    targets: list[str] = field(default_factory=list)
    match: BudgetMatch = BudgetMatch.none  # static: the r whose coordinates come closest to that budget


@dataclass
class SftSettings:
    """Lottery-ticket sparse fine-tuning (``+method=lt_sft``, Ansell et al. 2022): full
    fine-tuning for ``full_steps``, keep the ``k`` encoder parameters that moved most, reset the
    encoder to its pretrained values, fine-tune only those (the task head trains throughout)."""

    full_steps: int = 100  # the shared variant's full fine-tuning steps (per_language: each language's)
    k: int | None = None  # encoder parameters kept (None: keep_ratio of them)
    keep_ratio: float = 0.05
    per_language: bool = False  # one ticket per language, each from a copy fine-tuned on that language alone
    match: BudgetMatch = BudgetMatch.none  # static: k is that budget (sft.k and sft.keep_ratio unused)
    # composable LT-SFT (shared variant): each language's SFT from masked language modelling on its
    # raw text, added to the model in that language's training steps, evaluations and few-shot runs
    compose: bool = False
    language_steps: int = 100  # each of a language SFT's two phases (full, then sparse)
    language_k: int | None = None  # parameters of a language SFT (None: k)
    # raw text per language: <language_text>/<code>/train.txt (or train.conllu's words); a source
    # language without a folder there uses its training examples' words
    language_text: str | None = None
