"""The files under examples/ run as their docstrings say, from a fresh working folder: a method of
your own (by --config-dir), a layout of your own, and the library used from Python. (The task of
your own, examples/custom_task.py, is run by tests/test_task_data.py.)"""

import json
import os
import shutil
import subprocess
import sys

import torch
from conftest import REPO

from subnets.files import read_jsonl
from subnets.masks.subnetwork import SubnetworkSet

EXAMPLES = REPO / "examples"


def python(*arguments, cwd, timeout=600):
    return subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip


def test_a_method_of_your_own_runs_from_its_folder_by_config_dir(tmp_path):
    shutil.copy(EXAMPLES / "custom_method.py", tmp_path)
    shutil.copytree(EXAMPLES / "configs", tmp_path / "configs")
    run_dir = tmp_path / "run"
    done = python("-m", "subnets.train", "--config-dir", "configs", "+method=random_heads", "debug=tiny",
                  "train.steps=30", "fewshot.repetitions=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "random_heads"
    masks = SubnetworkSet.load(run_dir / "masks" / "masks.safetensors")
    assert list(masks) == ["syn_svo", "syn_sov", "syn_vso", "syn_osv"]
    for subnetwork in masks.values():  # two of the four heads of every layer
        assert subnetwork.unit_mask.sum(dim=1).tolist() == [2, 2]
    assert len({tuple(s.unit_mask.flatten().tolist()) for s in masks.values()}) > 1  # drawn per language
    assert results["sparsity"] == {lang: 0.5 for lang in masks}
    losses = [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses  # it learns
    assert torch.equal(SubnetworkSet.load(run_dir / "masks" / "masks.safetensors")["syn_svo"].unit_mask,
                       masks["syn_svo"].unit_mask)  # fmt: skip


def test_a_layout_of_your_own_is_probed_and_its_masked_updates_are_exact(tmp_path):
    done = python(EXAMPLES / "custom_layout.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "units per layer: {'heads': 2, 'neurons': 16}; the probe found the layout right" in done.stdout
    assert "all unchanged after 5 AdamW steps: True" in done.stdout


def test_the_library_from_python_runs_reuses_and_masks(tmp_path):
    done = python(EXAMPLES / "notebook_api.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "notebook" / "results.json").exists()
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "kept heads per layer: [2, 2]" and lines[-2].startswith("heads: [")
    assert any(line.startswith("mean target LAS:") for line in lines)
