"""Crash safety: SIGKILL mid-run, NaN/inf losses, reruns that must not overwrite results."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY, tiny_config, tiny_transformer

from subnets.checkpoint import load_checkpoint
from subnets.data.batching import Collator, encode_words
from subnets.data.treebank import Sentence
from subnets.experiment import Experiment, run
from subnets.files import read_jsonl
from subnets.models.encoder import Encoder, train_subword_tokenizer
from subnets.models.parser import DependencyParser
from subnets.optim import MaskedOptimizer
from subnets.training import linear_schedule, training_step


def train_command(run_dir, *extra):
    return [sys.executable, "-m", "subnets.train", *TINY, *extra, f"hydra.run.dir={run_dir}"]


@pytest.mark.parametrize("method", [[], ["+method=dynamic", "dynamic.update_every=2"], ["+method=maml_dynamic"]],
                         ids=["baseline", "dynamic", "maml_dynamic"])  # fmt: skip
def test_run_killed_with_sigkill_resumes_to_the_same_results(tmp_path, method):
    environment = {**os.environ, "WANDB_MODE": "disabled"}
    reference = subprocess.run(train_command(tmp_path / "reference", *method), env=environment,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]

    folder = tmp_path / "killed"
    process = subprocess.Popen(train_command(folder, *method), env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = folder / "checkpoints" / "last.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # somewhere after the first checkpoint (step 4 of 12)
    assert process.wait() == -signal.SIGKILL
    assert not (folder / "results.json").exists()  # it really died mid-run
    killed_at = load_checkpoint(checkpoint)["step"]
    assert 4 <= killed_at < 12

    resumed = subprocess.run(
        train_command(folder, *method), env=environment, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("reference", "killed")]
    assert results[0] == results[1]
    a, b = (
        load_checkpoint(tmp_path / r / "checkpoints" / "last.safetensors") for r in ("reference", "killed")
    )
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    if method:  # the masks, their history and the importance averages too
        assert a["method"]["history"] == b["method"]["history"]
        for lang, average in a["method"]["ema"]["averages"].items():
            assert torch.equal(average, b["method"]["ema"]["averages"][lang]), lang


def tiny_parser_step_inputs():
    transformer = tiny_transformer()
    words = ["the", "dog", "sees", "a", "cat"]
    tokenizer = train_subword_tokenizer([" ".join(words)] * 4, 60, 64)
    model = DependencyParser(Encoder(transformer), arc_dim=16, label_dim=8, dropout=0.0, word_dropout=0.0)
    sentence = Sentence("s1", words, ["DET", "NOUN", "VERB", "DET", "NOUN"], [2, 3, 0, 5, 3],
                        ["det", "nsubj", "root", "det", "obj"])  # fmt: skip
    batch = Collator(tokenizer, 64)([sentence], encode_words(tokenizer, [sentence]), "en")
    return model, batch


def test_nonfinite_step_updates_nothing(monkeypatch):
    model, batch = tiny_parser_step_inputs()
    optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model.named_parameters())
    scheduler = linear_schedule(optimizer, 0, 10)
    training_step(model, batch, optimizer, scheduler=scheduler)  # moments exist
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    lr = optimizer.param_groups[0]["lr"]

    forward = DependencyParser.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DependencyParser, "forward", poisoned)
    result = training_step(model, batch, optimizer, scheduler=scheduler)
    assert result.skipped and math.isnan(result.loss)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    for parameter, state in optimizer.state.items():
        assert all(torch.equal(v, moments[id(parameter)][k]) for k, v in state.items())
    assert optimizer.param_groups[0]["lr"] == lr  # the schedule did not advance


def poison_training_steps(monkeypatch, bad_steps):
    """Make the loss NaN in the given (1-based) training steps of a run."""
    forward, calls = DependencyParser.forward, {"n": 0}

    def poisoned(self, batch):
        out = forward(self, batch)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_steps:
                out.loss = out.loss * float("inf") * 0  # NaN
        return out

    monkeypatch.setattr(DependencyParser, "forward", poisoned)


def test_nan_steps_are_skipped_logged_and_the_run_finishes(tmp_path, monkeypatch):
    poison_training_steps(monkeypatch, {4, 5})
    results = run(tiny_config(), tmp_path)
    assert results["steps"] == 12
    logged = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r}
    assert logged[3]["train/skipped_steps"] == 0
    assert logged[6]["train/skipped_steps"] == pytest.approx(2 / 3)  # steps 4-6, log_every=3


def test_too_many_nan_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_training_steps(monkeypatch, set(range(6, 13)))
    with pytest.raises(
        FloatingPointError, match=r"3 steps in a row \(steps 6-8, train.max_nonfinite_steps=3\)"
    ):
        run(tiny_config("train.max_nonfinite_steps=3"), tmp_path)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert last["step"] == 4  # checkpoint_every=4; the one at step 8 was never written
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (tmp_path / "results.json").exists()


def test_overwrite_reruns_a_finished_run_from_scratch(tmp_path, monkeypatch):
    first = run(tiny_config(), tmp_path)
    (tmp_path / "stale.txt").write_text("from an earlier run")
    trained = []
    original = Experiment.train
    monkeypatch.setattr(Experiment, "train", lambda self: trained.append(self.step) or original(self))
    assert run(tiny_config("overwrite=true"), tmp_path) == first
    assert trained == [0]  # trained again, from step 0
    assert not (tmp_path / "stale.txt").exists()
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [3, 6, 9, 12]  # the old log was not appended to
