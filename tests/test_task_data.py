"""Tasks on real data and a task written outside the package (issue 27): UPOS tagging and masked
language modelling on the real UD treebanks of ../shared with multilingual-e5-small, causal
language modelling on their text with a tiny Qwen2, and examples/custom_task.py selected by its
``_target_`` from a config folder of its own."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, SOURCES
from test_shared import E5_PATH, UD_ROOT, needs_e5, needs_ud

from subnets.config import compose_config
from subnets.data.treebank import read_conllu
from subnets.training.runner import run

REAL = ["languages.train=[en_ewt,it_isdt]", "languages.dev=[bg_btb]", "languages.target=[br_keb]",
        "languages.max_train_sentences=200", "languages.max_eval_sentences=40", "train.steps=30",
        "train.batch_size=8", "train.eval_every=30", "train.checkpoint_every=30", "train.log_every=10",
        "train.warmup_steps=3", "fewshot.repetitions=1", "fewshot.steps=2", "fewshot.k=5", "wandb.mode=disabled"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.first
@pytest.mark.shared
@needs_ud
@needs_e5
def test_masked_language_modelling_on_real_ud_text_with_e5_small_and_static_neuron_masks(tmp_path):
    # 4 steps of 4 sentences (a step through e5-small's 250k-word output layer costs seconds): measured
    # perplexity 25079 (en_ewt) and 10017 (it_isdt), against 82593 and 28217 after one step of 8
    settings = ["+method=static", "masks.units=neurons", "masks.selection=keep_ratio", "masks.finetune_steps=0",
                "masks.importance_batches=2", "masks.batch_size=4", "train.steps=4", "train.eval_every=4",
                "train.checkpoint_every=4", "train.batch_size=4", "languages.max_eval_sentences=12"]  # fmt: skip
    cfg = compose_config(["+experiment=ud_e5", "task=mlm", *REAL, *settings, f"languages.ud_root={UD_ROOT}",
                          f"model.name_or_path={E5_PATH}"])  # fmt: skip
    results = run(cfg, tmp_path)
    perplexity = [s["perplexity"] for s in results["source"].values()]
    assert all(p < 83123 for p in perplexity), perplexity  # below a uniform guess over e5's vocabulary
    assert set(results["sparsity"]) == {"en_ewt", "it_isdt"}  # neuron masks found from the MLM loss
    assert (tmp_path / "masks" / "masks.safetensors").exists()


@pytest.mark.shared
@needs_ud
def test_causal_language_modelling_on_real_ud_text_with_a_tiny_qwen2_and_masks_reused_for_tagging(tmp_path):
    lm = run(compose_config(["model=tiny_qwen2", "debug=tiny", "task=clm", "languages=ud", *REAL,
                             f"languages.ud_root={UD_ROOT}", "+method=static", "masks.units=neurons",
                             "masks.selection=keep_ratio", "masks.finetune_steps=0"]), tmp_path / "clm")  # fmt: skip
    assert lm["task"]["name"] == "clm" and all(s["perplexity"] < 400 for s in lm["source"].values())
    masks = tmp_path / "clm" / "masks" / "masks.safetensors"
    tagging = run(compose_config(["model=tiny_qwen2", "debug=tiny", "task=pos", "languages=ud", *REAL,
                                  f"languages.ud_root={UD_ROOT}", "+method=static", "masks.units=neurons",
                                  f"masks.path={masks}"]), tmp_path / "pos")  # fmt: skip
    assert tagging["sparsity"] == lm["sparsity"]  # the language model's neurons, reused for another task


def test_a_task_of_your_own_is_selected_by_its_target(tmp_path, ud_root):
    data = tmp_path / "slash"
    for code in [*SOURCES, "syn_svo_na", "syn_vos"]:
        for split in ("train", "dev", "test"):
            sentences = read_conllu(ud_root / code / f"{split}.conllu").examples
            (data / code).mkdir(parents=True, exist_ok=True)
            (data / code / f"{split}.tags").write_text(
                "".join(" ".join(f"{f}/{t}" for f, t in zip(s.forms, s.upos)) + "\n" for s in sentences)
            )
    configs = tmp_path / "configs" / "task"
    configs.mkdir(parents=True)
    (configs / "slash.yaml").write_text("_target_: custom_task.SlashTagging\ndropout: 0.1\n")
    folder = tmp_path / "run"
    command = [sys.executable, "-m", "subnets.train", "--config-dir", str(tmp_path / "configs"), "task=slash",
               "debug=tiny", "train.steps=40", "+method=dynamic", "dynamic.update_every=10", "languages.source=ud",
               f"languages.ud_root={data}", "languages.target=[syn_vos]", f"hydra.run.dir={folder}"]  # fmt: skip
    environment = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO / "examples")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["task"]["name"] == "slash_tagging" and results["method"] == "dynamic"
    assert (
        sum(s["accuracy"] for s in results["source"].values()) / 4 > 50
    )  # the majority tag covers about 35%
    predicted = (folder / "predictions" / "syn_vos-test.tags").read_text().split("\n")[0].split()
    assert all("/" in token for token in predicted)
