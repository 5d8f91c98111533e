"""Shared fixtures: tiny configs composed exactly as the command line composes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from subnets.train import compose_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SUBNETS_SHARED", REPO.parent / "shared"))

# A run small enough for a test: 2-layer model, 80 sentences per language, 12 steps.
TINY = [
    "wandb.mode=disabled",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=400",
    "model.tiny.max_length=64",
    "task.arc_dim=32",
    "task.label_dim=16",
    "languages.synthetic.train=80",
    "languages.synthetic.dev=20",
    "languages.synthetic.test=30",
    "train.steps=12",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.checkpoint_every=4",
    "train.log_every=3",
    "fewshot.k=5",
    "fewshot.repetitions=2",
    "fewshot.steps=2",
]


def tiny_config(*overrides: str):
    """The runner's config with the TINY settings and ``overrides`` on top."""
    return compose_config([*TINY, *overrides])


class Crash(RuntimeError):
    """The simulated crash of :func:`crash_after_checkpoint`."""


def crash_after_checkpoint(monkeypatch, cfg, folder, step: int = 8) -> None:
    """Run ``cfg`` in ``folder`` until the checkpoint at ``step`` is written, then crash."""
    from subnets.experiment import Experiment, run

    original = Experiment.save_checkpoint

    def save_then_crash(self):
        path = original(self)
        if self.step == step:
            raise Crash(f"simulated crash after the checkpoint at step {step}")
        return path

    monkeypatch.setattr(Experiment, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run(cfg, folder)
    monkeypatch.setattr(Experiment, "save_checkpoint", original)


@pytest.fixture(autouse=True)
def _quiet_and_deterministic(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)


def tiny_transformer(
    architecture: str = "bert", attn: str | None = "eager", layers: int = 2, heads: int = 4, seed=0
):
    from subnets.models.encoder import build_tiny_transformer

    model = build_tiny_transformer(
        vocab_size=120, hidden_size=32, num_layers=layers, num_heads=heads, intermediate_size=64,
        max_length=64, architecture=architecture, attn_implementation=attn, seed=seed, pad_token_id=0,
    )  # fmt: skip
    return model.eval()
