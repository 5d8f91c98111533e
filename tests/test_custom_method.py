"""README's worked example of a method of your own, run exactly as written from a folder outside
the package: the module and the config are cut out of README.md, the command is README's with
a debug-sized job appended."""

import json
import os
import re
import subprocess
import sys

import torch
from conftest import REPO

from subnets.files import read_jsonl
from subnets.masks.subnetwork import SubnetworkSet


def readme_example() -> tuple[dict[str, str], list[str]]:
    """The files (path -> text) and the command of README's "A method of your own"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("**A method of your own**") :]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)[:3]
    assert [kind for kind, _ in blocks] == ["python", "yaml", "bash"]
    files = {re.search(r"^# file: (\S+)$", body, flags=re.M).group(1): body for _, body in blocks[:2]}
    command = blocks[2][1].split("#")[0].split()
    assert command[:3] == ["python", "-m", "subnets.train"]
    assert len(files["my_methods.py"].splitlines()) < 40
    return files, command[1:]


def test_readme_custom_method_runs_from_a_folder_outside_the_package(tmp_path):
    files, arguments = readme_example()
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    run_dir = tmp_path / "run"
    job = ["debug=tiny", "train.steps=30", "fewshot.repetitions=1", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, *arguments, *job], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip
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
