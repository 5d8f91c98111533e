"""Settings checked before any work: each key's valid range (``RULES``), and the error that
names a setting outside it."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


class SettingError(ValueError):
    """A setting outside its valid range (the message names the key, the value and the range)."""


def _positive(v):
    return v is not None and v > 0


def _non_negative(v):
    return v is not None and v >= 0


def _share(v):  # a share of units kept: (0, 1]
    return v is not None and 0 < v <= 1


def _probability(v):  # dropout and the like: [0, 1)
    return v is not None and 0 <= v < 1


# (key, check, what is valid): checked by validate_config before any work.
RULES: list[tuple[str, Any, str]] = [
    *[
        (f"train.{k}", _positive, "a positive integer")
        for k in (
            "steps",
            "batch_size",
            "eval_batch_size",
            "eval_every",
            "checkpoint_every",
            "log_every",
            "max_nonfinite_steps",
            "divergence_patience",
        )
    ],  # fmt: skip
    *[
        (f"train.{k}", _non_negative, ">= 0")
        for k in ("lr_encoder", "lr_head", "weight_decay", "warmup_steps", "clip_norm", "sampling_alpha")
    ],  # fmt: skip
    ("train.divergence_factor", lambda v: v == 0 or v > 1, "0 (off) or a factor > 1"),
    (
        "languages.max_train_sentences",
        lambda v: v is None or v > 0,
        "null (all) or a positive number of sentences",
    ),
    (
        "languages.max_eval_sentences",
        lambda v: v is None or v > 0,
        "null (all) or a positive number of sentences",
    ),
    *[
        (f"languages.synthetic.{k}", _positive, "a positive number of sentences")
        for k in ("train", "dev", "test")
    ],
    ("model.mix_dropout", _probability, "in [0, 1)"),
    ("model.encoder_dropout", lambda v: v is None or 0 <= v < 1, "null (the model's own) or in [0, 1)"),
    ("model.max_subwords", lambda v: v is None or v >= 3, "null (the model's limit) or at least 3"),
    ("task.dropout", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("task.word_dropout", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("masks.keep_ratio", _share, "in (0, 1]"),
    ("masks.param_keep_ratio", _share, "in (0, 1]"),
    ("masks.prune_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("masks.threshold", _share, "in (0, 1]"),
    ("masks.top_k", lambda v: v is None or v > 0, "null or a positive number of heads"),
    ("masks.min_heads_per_layer", _positive, "a positive number of heads"),
    ("masks.activation_quantile", lambda v: 0 <= v < 1, "a quantile in [0, 1)"),
    *[
        (f"masks.{k}", _positive, "a positive integer")
        for k in ("importance_batches", "batch_size", "param_samples")
    ],
    ("masks.finetune_steps", _non_negative, ">= 0"),
    ("masks.after_steps", _non_negative, ">= 0 (0: before training)"),
    ("dynamic.update_every", _positive, "a positive number of steps"),
    ("dynamic.decay", _probability, "in [0, 1)"),
    ("dynamic.score_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("dynamic.gate_lr", _non_negative, ">= 0"),
    ("dynamic.temperature", _positive, "> 0"),
    *[
        (f"meta.{k}", _positive, "a positive integer")
        for k in ("inner_steps", "languages_per_episode", "support_size", "query_size")
    ],  # fmt: skip
    *[
        (f"meta.{k}", _positive, "> 0 (learned as a logarithm)")
        for k in ("inner_lr_encoder", "inner_lr_head")
    ],
    ("meta.inner_clip_norm", _non_negative, ">= 0 (0: no clipping)"),
    ("fewshot.k", _positive, "a positive number of support sentences"),
    ("fewshot.repetitions", _non_negative, ">= 0 (0: no few-shot protocol)"),
    ("fewshot.steps", _non_negative, ">= 0"),
    ("fewshot.max_tokens", _positive, "a positive number of subwords per micro-batch"),
    *[(f"fewshot.{k}", _non_negative, ">= 0") for k in ("lr_encoder", "lr_head", "weight_decay")],
    *[(f"analysis.{k}", _non_negative, ">= 0 (0: off)") for k in ("conflict_every", "cka_sentences")],
    ("analysis.conflict_batch_size", _positive, "a positive number of sentences"),
]


def validate_config(cfg: Any) -> None:
    """Check every setting against its valid range (``RULES``) before any work is done.

    Raises:
        SettingError: naming the first settings outside their range, their values and the ranges.
    """
    problems = []
    for key, check, valid in RULES:
        value = OmegaConf.select(cfg, key)
        try:
            ok = bool(check(value))
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{key}={value!r}: expected {valid}")
    if problems:
        raise SettingError("invalid settings:\n  " + "\n  ".join(problems))


def setting(value: Any) -> Any:
    """A config value as plain Python (structured configs hold enum members for choices)."""
    return getattr(value, "value", value)
