"""Watching a run: log lines off a terminal, seconds per phase, W&B as configured."""

from __future__ import annotations

import pytest
from conftest import TINY, tiny_config
from helpers import python

from subnets.training.runner import run
from subnets.training.tracking import Tracker, wandb_mode

STATIC = ["+method=static", "masks.finetune_steps=2", "masks.selection=top_k", "masks.top_k=4"]
PHASE_LINES = ["mask search, syn_svo: kept 4 of 8 units", "step 3/12  loss", "step 12/12  loss",
               "development evaluation at step 6: syn_svo_na", "final evaluation, target language syn_vos (test",
               "few-shot, syn_vos: UAS"]  # fmt: skip


def test_a_run_off_a_terminal_logs_progress_and_phases_to_train_log_and_stderr(tmp_path):
    folder = tmp_path / "run"
    done = python("subnets.train", *TINY, *STATIC, f"hydra.run.dir={folder}", cwd=tmp_path,
                  env={"WANDB_MODE": "disabled"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = (folder / "train.log").read_text()
    for line in PHASE_LINES:
        assert line in log and line in done.stderr, line
    assert "ETA" in log and "words/s" in log
    assert "it/s]" not in done.stderr and "step/s]" not in done.stderr  # no progress bar off a terminal
    assert done.stdout.rstrip().splitlines()[-1].startswith("mean")  # the results table ends the output
    assert "INFO" not in done.stdout  # log lines go to stderr, the table to stdout


def test_a_run_from_python_writes_its_log_and_the_seconds_of_each_phase(tmp_path):
    results = run(tiny_config(*STATIC), tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert all(line in log for line in PHASE_LINES)
    seconds = results["seconds"]
    phases = ["setup", "mask_search", "training_steps", "dev_evaluation", "checkpoints", "final_evaluation",
              "few_shot"]  # fmt: skip
    assert set(phases) <= set(seconds) and all(seconds[p] > 0 for p in phases)
    assert sum(seconds[p] for p in seconds if p != "total") <= seconds["total"] + 0.05


@pytest.mark.parametrize(
    ("configured", "environment", "expected"),
    [("offline", "disabled", "offline"), ("disabled", "online", "disabled"), (None, "disabled", "disabled"),
     (None, "dryrun", "offline"), (None, None, "offline")],
)  # fmt: skip
def test_the_wandb_mode_comes_from_the_config_then_the_environment_then_offline(
    monkeypatch, configured, environment, expected
):
    if environment is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", environment)
    assert wandb_mode(configured) == expected


def test_an_unknown_wandb_mode_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlne")
    with pytest.raises(ValueError, match="WANDB_MODE='offlne'"):
        wandb_mode(None)


def fake_wandb(monkeypatch):
    """Replace ``wandb.init`` by a recorder of its arguments; returns the calls."""
    import wandb

    calls = []

    class FakeRun:
        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        calls.append(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    return calls


def test_disabled_from_the_environment_starts_no_wandb(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run(tiny_config("wandb.mode=null"), tmp_path)
    assert calls == [] and not (tmp_path / "wandb_id").exists() and not (tmp_path / "wandb").exists()


def test_a_configured_mode_beats_the_environment_and_wandb_stays_quiet(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = tiny_config("wandb.mode=offline")
    tracker = Tracker(tmp_path)
    tracker.start_wandb(cfg.wandb, "default", {})
    assert [c["mode"] for c in calls] == ["offline"] and calls[0]["settings"].silent
    tracker.start_wandb(tiny_config("wandb.mode=offline", "wandb.verbose=true").wandb, "default", {})
    assert not calls[1]["settings"].silent and calls[1]["id"] == calls[0]["id"]  # the folder's run resumed
