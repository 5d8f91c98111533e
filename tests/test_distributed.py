"""Data-parallel training with torch.distributed (gloo, 2 CPU processes)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TINY, tiny_config
from helpers import spawn

from subnets.training.runner import Run

# Dropout off, so that the two processes' half batches and the one process's whole batch see
# the same network; each process trains on 4 sentences (MAML: 4 query sentences, the support
# batch is shared), the single process on all 8.
EXACT = ["model.encoder_dropout=0", "task.dropout=0", "task.word_dropout=0", "train.steps=6",
         "train.eval_every=6", "train.checkpoint_every=6", "fewshot.repetitions=1"]  # fmt: skip
METHODS = {
    "baseline": [],
    "dynamic": ["+method=dynamic", "dynamic.update_every=2"],
    "maml_static": ["+method=maml_static", "masks.selection=keep_ratio", "masks.finetune_steps=0"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, overrides: list[str], folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", WANDB_MODE="disabled")  # fmt: skip
    torch.set_num_threads(1)
    experiment = Run(tiny_config(*overrides), folder)
    try:
        experiment.setup()
        experiment.train()
        masks = getattr(experiment.method.policy, "masks", None)
        torch.save(
            {
                "model": experiment.model.state_dict(),
                "masks": {k: v.unit_mask for k, v in masks.items()} if masks is not None else {},
            },
            f"{folder}/rank{rank}.pt",
        )
        if experiment.parallel.is_main:
            experiment.final_evaluation()
    finally:
        experiment.close()


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_agree_and_equal_one_process_on_the_combined_batch(tmp_path, method):
    settings = [*EXACT, *METHODS[method]]
    folder = tmp_path / "parallel"
    spawn(_worker, ([*settings, "train.batch_size=4", "meta.query_size=4"], str(folder), free_port()))
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), name  # bit-identical on both ranks
    for lang, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][lang]), lang
    assert not (folder / "rank1").exists()

    single = Run(tiny_config(*settings, "train.batch_size=8", "meta.query_size=8"), tmp_path / "single")
    single.setup()
    single.train()
    # Same sentences per step; only the order of floating-point sums differs.
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    results = single.final_evaluation()
    single.close()
    parallel = json.loads((folder / "results.json").read_text())
    for language, scores in results["source"].items():
        assert parallel["source"][language]["las"] == pytest.approx(scores["las"], abs=1.0)


def test_torchrun_command_trains_and_only_rank_0_writes(tmp_path):
    folder = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "subnets.train", *TINY, *EXACT, "train.batch_size=4", f"hydra.run.dir={folder}"]  # fmt: skip
    environment = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["steps"] == 6 and results["source"]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [3, 6]  # one writer (log_every=3)
