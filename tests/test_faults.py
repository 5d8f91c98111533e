"""Crash safety: SIGKILL mid-run, NaN/inf losses, reruns that must not overwrite results."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY, scores, tiny_config, tiny_transformer
from helpers import python

from subnets.data.batching import Collator, encode_words
from subnets.data.treebank import Sentence
from subnets.files import read_jsonl
from subnets.models.encoder import Encoder, train_subword_tokenizer
from subnets.models.parser import DependencyParser
from subnets.optim import MaskedOptimizer
from subnets.runs.checkpoint import load_checkpoint
from subnets.training.guards import DivergenceGuard
from subnets.training.runner import Run, run
from subnets.training.update import linear_schedule, training_step


def train_command(run_dir, *extra):
    return [sys.executable, "-m", "subnets.train", *TINY, *extra, f"hydra.run.dir={run_dir}"]


# ``python -m subnets.train`` that kills itself with SIGKILL right after writing the checkpoint of
# step 8 (of 12): a real kill at a known step, not one timed from outside (a busy machine could let
# the run finish before the test's kill).
KILLED_AFTER_CHECKPOINT = textwrap.dedent("""
    import os, signal
    from subnets.cli.train import main
    from subnets.training.runner import Run

    save = Run.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.state.step == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Run.save_checkpoint = save_then_die
    main()
""")


@pytest.mark.slow
# The baseline's state (model, optimizer, schedule, sampler, random generators) is a part of both;
# an in-process crash of every method resumes exactly (test_runner, test_static, test_dynamic, test_maml, test_controls).
@pytest.mark.parametrize("method", [["+method=dynamic", "dynamic.update_every=2"], ["+method=maml_dynamic"]],
                         ids=["dynamic", "maml_dynamic"])  # fmt: skip
def test_run_killed_with_sigkill_resumes_to_the_same_results(tmp_path, method):
    # (the kill in a python of its own; the uninterrupted and the resumed run in processes that need
    # not import the library again: helpers.python)
    environment = {**os.environ, "WANDB_MODE": "disabled"}
    reference = python(*train_command(tmp_path / "reference", *method)[2:], env=environment)
    assert reference.returncode == 0, reference.stderr[-3000:]

    folder = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_CHECKPOINT, *train_command(folder, *method)[3:]],
                            env=environment, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (folder / "results.json").exists()  # it really died mid-run
    assert load_checkpoint(folder / "checkpoints" / "last.safetensors")["step"] == 8

    resumed = python(*train_command(folder, *method)[2:], env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("reference", "killed")]
    assert scores(results[0]) == scores(results[1])
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
    last = tmp_path / "checkpoints" / "last.safetensors"
    with pytest.raises(FloatingPointError) as error:
        run(tiny_config("train.max_nonfinite_steps=3"), tmp_path)
    assert "3 steps in a row (steps 6-8, train.max_nonfinite_steps=3)" in str(error.value)
    assert f"the last good checkpoint is {last} (step 4)" in str(error.value)  # step 5 was fine
    last = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert last["step"] == 4  # checkpoint_every=4; the one at step 8 was never written
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (tmp_path / "results.json").exists()


def test_divergence_guard_flags_intervals_far_above_the_running_best():
    guard = DivergenceGuard(factor=10.0, patience=2)
    flags = [guard.check(step, loss) for step, loss in [(1, 5.0), (2, 2.0), (3, 25.0), (4, 19.0), (5, 21.0)]]
    # 25 > 10 x 2 (flagged), 19 < 20 (not: the streak ends), 21 > 20 (flagged again)
    assert flags == [False, False, True, False, True]
    assert (guard.best, guard.best_step, guard.flagged, guard.in_a_row) == (2.0, 2, 2, 1)
    assert not guard.exhausted
    assert guard.check(6, 1e6) and guard.exhausted and guard.streak_start == 5
    restored = DivergenceGuard(10.0, 2)
    restored.load_state_dict(guard.state_dict())
    assert restored == guard
    assert not any(DivergenceGuard(factor=0).check(s, loss) for s, loss in [(1, 1.0), (2, 1e9)])


# Adam at a learning rate of 3 (reached over 20 warm-up steps): the loss of steps 1-3 is about 14,
# then hundreds and thousands (measured: 14, 388, 257, 1145, 49429, ...), never NaN.
EXPLODING = ["train.lr_encoder=3", "train.lr_head=3", "train.warmup_steps=20", "train.steps=30"]


def test_a_diverging_run_stops_saying_that_no_good_checkpoint_is_kept(tmp_path, caplog):
    with caplog.at_level("WARNING"), pytest.raises(FloatingPointError) as error:
        run(tiny_config(*EXPLODING), tmp_path)
    message = str(error.value)
    assert "3 log intervals in a row (steps 6-12)" in message and "train.divergence_patience=3" in message
    last = tmp_path / "checkpoints" / "last.safetensors"
    # step 5's loss (measured: hundreds) was already above 10 x the first step's: the weights of step 4 had
    # exploded, so the checkpoint is not called good (issue 26)
    assert "last good checkpoint" not in message
    assert (
        f"no good checkpoint is kept: {last} (step 4) holds weights whose next loss was already wrong"
        in message
    )
    # checkpoint_every=4: the one at step 8 fell inside the streak and was not written
    assert load_checkpoint(last)["step"] == 4
    assert (
        "step 6: training loss" in caplog.text
        and "is above 10 x the lower of the first step's loss" in caplog.text
    )
    assert not (tmp_path / "results.json").exists()


def test_diverging_intervals_are_counted_in_the_results(tmp_path):
    results = run(tiny_config(*EXPLODING, "train.divergence_patience=100", "fewshot.repetitions=0"), tmp_path)
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    initial = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["divergence"]["initial"]
    best, flagged = math.inf, 0
    for loss in losses:  # the rule, recomputed from the logged interval means and the first step's loss
        if loss > 10 * min(initial, best):
            flagged += 1
        else:
            best = min(best, loss)
    assert flagged >= 5 and results["diverging_log_intervals"] == flagged
    assert results["status"] == "diverged" and results["divergence"]["since_step"] == 6


def test_overwrite_reruns_a_finished_run_from_scratch(tmp_path, monkeypatch):
    first = run(tiny_config(), tmp_path)
    (tmp_path / "stale.txt").write_text("from an earlier run")
    trained = []
    original = Run.train
    monkeypatch.setattr(Run, "train", lambda self: trained.append(self.state.step) or original(self))
    assert scores(run(tiny_config("overwrite=true"), tmp_path)) == scores(first)
    assert trained == [0]  # trained again, from step 0
    assert not (tmp_path / "stale.txt").exists()
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [3, 6, 9, 12]  # the old log was not appended to
