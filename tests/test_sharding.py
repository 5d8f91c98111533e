"""Sharded training with FSDP2 (train.parallel=fsdp; gloo, 2 CPU processes)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import TINY, tiny_config
from helpers import python, spawn
from test_distributed import free_port

from subnets.cli.consolidate import consolidate_run
from subnets.config import SettingError
from subnets.files import read_jsonl
from subnets.optim import MaskedOptimizer
from subnets.parallel.sharding import consolidated_model_state
from subnets.runs.checkpoint import load_checkpoint
from subnets.training.assemble import check_settings
from subnets.training.runner import Run, run

# Dropout off, so that two processes' half batches and one process's whole batch see the same
# network; each process trains on 4 sentences, the single process on all 8.
EXACT = ["model.encoder_dropout=0", "task.dropout=0", "task.word_dropout=0", "fewshot.repetitions=1"]
QWEN2 = ["model.tiny.architecture=qwen2"]
# keep_ratio masks of heads and neurons, a quarter each: some coordinates no language updates
MASKS = ["masks.selection=keep_ratio", "masks.keep_ratio=0.25", "masks.units=both", "masks.finetune_steps=0"]
METHODS = {
    "baseline": [],
    "static": ["+method=static", *MASKS],
    "dynamic": ["+method=dynamic", "dynamic.update_every=4", *MASKS],
    "random": ["+method=random", *MASKS],
}


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), WANDB_MODE="disabled")  # fmt: skip
    torch.set_num_threads(1)


def _run_worker(rank: int, world: int, overrides: list[str], folder: str, port: int, copy_at: int = 0,
                kind: str = "last", copy_to: str = "") -> None:  # fmt: skip
    """One process of a sharded run (the runner's ``run``). With ``copy_at``, the run's folder as it
    stands right after the ``kind`` checkpoint (``last`` or ``best``) of step ``copy_at`` is copied to
    ``copy_to``, every process waiting: the files a run killed at that moment leaves, while this
    run goes on uninterrupted."""
    _join(rank, world, port)
    if copy_at:

        def copy_folder(training: Run) -> None:
            training.parallel.barrier()  # every process has written its part
            if training.parallel.is_main:
                shutil.copytree(folder, copy_to)
            training.parallel.barrier()

        if kind == "last":
            original = Run.save_checkpoint

            def save_then_copy(self):
                path = original(self)
                if self.state.step == copy_at:
                    copy_folder(self)
                return path

            Run.save_checkpoint = save_then_copy
        else:
            validate = Run.validate

            def validate_then_copy(training):
                metric = validate(training)
                if training.state.step == copy_at:
                    if training.parallel.is_main:  # (rank 0 writes the file)
                        assert load_checkpoint(training.paths.best_checkpoint)["step"] == copy_at
                    copy_folder(training)
                return metric

            Run.validate = validate_then_copy
    run(tiny_config(*overrides), folder)


def sharded_run(folder, overrides, world: int = 2, copy_at: int = 0, kind: str = "last", copy_to="") -> dict:
    spawn(_run_worker, (world, list(overrides), str(folder), free_port(), copy_at, kind, str(copy_to)), world)
    return json.loads((folder / "results.json").read_text())


def last_model(folder) -> dict[str, torch.Tensor]:
    """The whole model of a run's last checkpoint, sharded or not."""
    state = load_checkpoint(folder / "checkpoints" / "last.safetensors")
    return (
        state["model"]
        if "model" in state
        else consolidated_model_state(folder / "checkpoints" / state["sharded"])
    )


def training_losses(folder) -> list[float]:
    return [r["train/loss"] for r in read_jsonl(folder / "metrics.jsonl") if "train/loss" in r]


def reference_run(folder, overrides) -> tuple[dict, dict, Run]:
    """One process on the combined batch: its results, its initial weights and the run."""
    single = Run(tiny_config(*overrides), folder)
    try:
        single.setup()
        initial = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
        single.train()
        results = single.final_evaluation()
    finally:
        single.close()
    return results, initial, single


@pytest.mark.parametrize(
    ("architecture", "method"),
    [pytest.param("qwen2", m, marks=[] if m == "static" else pytest.mark.slow) for m in METHODS]
    + [pytest.param("bert", "static", marks=pytest.mark.slow)],
)
def test_sharded_run_equals_one_process_and_learns(tmp_path, architecture, method):
    settings = [f"model.tiny.architecture={architecture}", *EXACT, *METHODS[method]]
    results = sharded_run(tmp_path / "sharded", [*settings, "train.parallel=fsdp", "train.batch_size=4"])
    reference, initial, single = reference_run(tmp_path / "single", [*settings, "train.batch_size=8"])

    sharded, whole = last_model(tmp_path / "sharded"), last_model(tmp_path / "single")
    assert sharded.keys() == whole.keys()
    # the same sentences per step: only the order of floating-point sums differs
    for name, tensor in whole.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    if method in ("static", "random"):  # coordinates no language's mask holds stay initial, to the bit
        union = single.method.policy.union_update_mask(list(single.data.train))
        frozen = 0
        for name, mask in union.items():
            assert torch.equal(sharded[name][~mask], initial[name][~mask]), name
            frozen += int((~mask).sum())
        assert frozen > 1000
    losses = training_losses(tmp_path / "sharded")
    assert losses == pytest.approx(training_losses(tmp_path / "single"), rel=1e-4)
    assert losses[-1] < losses[0] - 0.3  # it learns
    norms = [[r["train/grad_norm"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/grad_norm" in r]
             for name in ("sharded", "single")]  # fmt: skip
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # the norm over every process's shards
    for language, scores in reference["source"].items():
        assert results["source"][language]["las"] == pytest.approx(scores["las"], abs=1.0)
    for language, scores in reference["fewshot"]["languages"].items():  # every process fine-tunes alike
        assert results["fewshot"]["languages"][language]["las_mean"] == pytest.approx(
            scores["las_mean"], abs=1.0
        )
    assert sorted(p.name for p in (tmp_path / "sharded" / "checkpoints").iterdir()) == [
        f"best-{results['best_step']}.dcp", "best.safetensors", "last-12.dcp", "last.safetensors"]  # fmt: skip


TINY_MODELS = {  # a model of odd sizes (nothing divides by 2), its layers, and three masked parameters
    "qwen2": (
        lambda: transformers.Qwen2Model(transformers.Qwen2Config(
            vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)),
        "layers",
        ["layers.0.self_attn.q_proj.weight", "layers.1.mlp.up_proj.weight", "embed_tokens.weight"],
    ),
    "bert": (
        lambda: transformers.BertModel(transformers.BertConfig(
            vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        "encoder.layer",
        ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight",
         "embeddings.word_embeddings.weight"],
    ),
}  # fmt: skip


def _masked_step_worker(rank: int, port: int, folder: str, architecture: str) -> None:
    """Masked AdamW steps on a tiny decoder or encoder, sharded over 2 processes and whole."""
    from torch.distributed.fsdp import fully_shard

    from subnets.models.layouts import layer_list

    _join(rank, 2, port)
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    build, layers, (query, feed_forward, embeddings) = TINY_MODELS[architecture]
    whole, sharded = build(), build()
    sharded.load_state_dict(whole.state_dict())
    initial = {k: v.clone() for k, v in whole.state_dict().items()}
    for layer in layer_list(sharded, layers):
        fully_shard(layer)
    fully_shard(sharded)
    generator = torch.Generator().manual_seed(1)
    masks = {  # rows of two query heads (a block mask), and random unstructured masks
        query: torch.arange(32).view(32, 1).expand(32, 32) < 16,
        feed_forward: torch.rand(72, 32, generator=generator) < 0.3,
        embeddings: torch.rand(97, 32, generator=generator) < 0.5,
    }
    ids = torch.randint(0, 97, (3, 7), generator=generator)
    out = {}
    for kind, model in (("whole", whole), ("sharded", sharded)):
        optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1),
                                    model.named_parameters())  # fmt: skip
        for step in range(3):  # the same batch on both processes: FSDP2's mean is the whole gradient
            optimizer.zero_grad()
            model((ids + step) % 97).last_hidden_state.pow(2).mean().backward()
            optimizer.step(update_mask=masks)
        state = model.state_dict()
        out[kind] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
        exp_avg = optimizer.state[dict(model.named_parameters())[embeddings]]["exp_avg"]
        out[kind + "_exp_avg"] = exp_avg.full_tensor() if hasattr(exp_avg, "full_tensor") else exp_avg
    if rank == 0:
        torch.save({"initial": initial, "masks": masks, "embeddings": embeddings, **out}, f"{folder}/step.pt")
    torch.distributed.barrier()  # no process leaves while another still talks to it
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("architecture", list(TINY_MODELS))
def test_masked_optimizer_on_shards_equals_the_whole_step_and_freezes_to_the_bit(tmp_path, architecture):
    spawn(_masked_step_worker, (free_port(), str(tmp_path), architecture))
    saved = torch.load(tmp_path / "step.pt")
    whole, sharded, initial = saved["whole"], saved["sharded"], saved["initial"]
    for name, mask in saved["masks"].items():
        assert torch.equal(sharded[name][~mask], initial[name][~mask]), name  # frozen, weight decay and all
        assert not torch.equal(sharded[name][mask], initial[name][mask]), name
    for name, tensor in whole.items():  # identical inputs on both ranks: the same floating-point step
        assert torch.equal(sharded[name], tensor), name
    frozen = ~saved["masks"][saved["embeddings"]]
    assert torch.equal(saved["sharded_exp_avg"], saved["whole_exp_avg"])
    assert not saved["sharded_exp_avg"][frozen].any()  # Adam's moments never advanced where frozen


# Every task once, every method that runs sharded, a kill after each kind of checkpoint: "last"
# at step 8 (resumed from it), "best" at step 6, the first development evaluation (resumed from
# the last checkpoint at step 4, the best one ahead of it).
TASK_SETTINGS = {"parsing": [], "tagging": ["task=tagging"], "ner": ["task=ner"],
                 "classification": ["task=classification"], "mlm": ["task=mlm"], "clm": ["task=clm", *QWEN2]}  # fmt: skip
RESUMES = [("clm", "static", "last"), ("parsing", "dynamic", "best"), ("tagging", "random", "best"),
           ("ner", "baseline", "last"), ("classification", "static", "best"), ("mlm", "dynamic", "last")]  # fmt: skip


@pytest.mark.parametrize(
    ("task", "method", "kind"),
    [pytest.param(*case, marks=[] if case[0] == "clm" else pytest.mark.slow) for case in RESUMES],
)
def test_a_sharded_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_results(
    tmp_path, task, method, kind
):
    # (the clm case: the scalar mix of layers gets no gradient under a language-model head, so
    # the saved shards hold no optimizer state for it, and loading them used to refuse)
    # The uninterrupted run's folder copied right after that checkpoint is what a kill then leaves.
    settings = [*TASK_SETTINGS[task], *METHODS[method], "train.parallel=fsdp", "train.batch_size=4"]
    killed_at = {"last": 8, "best": 6}[kind]
    reference = sharded_run(tmp_path / "reference", settings, copy_at=killed_at, kind=kind,
                            copy_to=tmp_path / "resumed")  # fmt: skip
    assert not (tmp_path / "resumed" / "results.json").exists()
    checkpoint = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    assert checkpoint["step"] == (8 if kind == "last" else 4)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_ranks"]) == 2
    assert "model" not in checkpoint and "optimizer" not in checkpoint  # in the shards
    if task == "clm":  # another number of processes is refused, saying why
        with pytest.raises(Exception):  # noqa: B017 (the message is checked in the log below)
            sharded_run(tmp_path / "resumed", settings, world=1)
        log = (tmp_path / "resumed" / "train.log").read_text()
        assert "was written by 2 processes, this run has 1" in log and "--nproc_per_node=2" in log

    resumed = sharded_run(tmp_path / "resumed", settings)
    del resumed["seconds"], reference["seconds"]
    assert resumed == reference  # every score, few-shot, best step and development metric
    a, b = last_model(tmp_path / "reference"), last_model(tmp_path / "resumed")
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    losses = training_losses(tmp_path / "reference")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses  # (it learns)
    logged = [{r["step"]: r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r}
              for name in ("reference", "resumed")]  # fmt: skip
    assert list(logged[0]) == list(logged[1]) == [3, 6, 9, 12]  # each step once
    # (the interval around the kill began before it: the resumed log holds its last steps alone)
    for step in {3, 6, 9, 12} - {9 if kind == "last" else 6}:
        assert logged[0][step] == logged[1][step]


@pytest.mark.slow
def test_torchrun_command_then_consolidate_and_evaluate(tmp_path):
    folder = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "subnets.train", *TINY, *QWEN2, *EXACT, "+method=dynamic", "train.parallel=fsdp",
               "train.precision=bf16", "model.gradient_checkpointing=true", f"hydra.run.dir={folder}"]  # fmt: skip
    environment = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    losses = training_losses(folder)
    assert losses[-1] < losses[0] - 0.3  # bf16 layers with activation checkpointing learn

    evaluate = ["subnets.evaluate", f"run={folder}", f"output={tmp_path / 'evaluation'}"]
    refused = python(*evaluate, env=environment)
    assert refused.returncode == 1 and "python -m subnets.consolidate" in refused.stderr

    assert consolidate_run(folder) == [folder / "checkpoints" / "last.safetensors",
                                       folder / "checkpoints" / "best.safetensors"]  # fmt: skip
    evaluated = python(*evaluate, env=environment)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    for language, scores in results["source"].items():  # one process, the consolidated best model
        assert again["source"][language]["las"] == pytest.approx(scores["las"], abs=0.5)


def test_settings_fsdp_refuses_with_the_reason():
    for overrides, expected in [
        (["+method=maml"], "meta-learns (MAML)"),
        (["+method=lora"], "copies or wraps the model"),
        (["+method=lt_sft"], "copies or wraps the model"),
        (["train.compile=true"], "train.compile=true"),
        (["train.keep_optimizer_state=false"], "train.keep_optimizer_state=false"),
        (["analysis.conflict_every=5"], "analysis.conflict_every=5"),
    ]:
        with pytest.raises(SettingError, match=re.escape(expected)):
            check_settings(tiny_config("train.parallel=fsdp", *overrides))


def test_fsdp_without_torchrun_and_cuda_without_a_gpu_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SettingError, match="torchrun --nproc_per_node=N -m subnets.train"):
        Run(tiny_config("train.parallel=fsdp"), tmp_path / "a").setup()
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="train.device=cuda: this machine has no CUDA device"):
            Run(tiny_config("train.device=cuda"), tmp_path / "b").setup()


def test_gradient_checkpointing_recomputes_the_same_step_under_gates(tmp_path):
    settings = [*QWEN2, *EXACT, "+method=dynamic", "dynamic.update_every=4", "train.steps=6"]
    models = []
    for checkpointing in ("false", "true"):
        single = Run(
            tiny_config(*settings, f"model.gradient_checkpointing={checkpointing}"), tmp_path / checkpointing
        )
        single.setup()
        transformer = single.model.encoder.transformer
        active = getattr(
            transformer, "is_activation_checkpointing", None
        )  # transformers 5; 4 has the older name
        assert (transformer.is_gradient_checkpointing if active is None else active) == (
            checkpointing == "true"
        )
        single.train()
        single.close()
        models.append(single.model.state_dict())
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def _importance_worker(rank: int, port: int, folder: str) -> None:
    """Unit importance and Fisher per unit of a tiny Qwen2 decoder, whole, then sharded."""
    from subnets.masks import fisher_information, fisher_per_unit, unit_importance
    from subnets.models.gates import UnitGates
    from subnets.parallel.sharding import shard_model

    _join(rank, 2, port)
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config)
    gates = UnitGates(model.model, "both")
    generator = torch.Generator().manual_seed(1)  # the same batches on both processes
    batches = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (4, 2, 9), generator=generator)
    ]
    loss = lambda batch: model(**batch).loss  # noqa: E731
    owned = [n for n, p in model.named_parameters() if any(p is o.parameter for o in gates.owned)]

    def scores():
        fisher = fisher_information(model, batches, loss, parameters=owned)
        return unit_importance(model, batches, loss, gates=gates), fisher_per_unit(fisher, model, gates)

    whole = scores()
    names = {id(p): n for n, p in model.named_parameters()}
    shard_model(model, model.model.layers)
    sharded_parameters = dict(model.named_parameters())
    gates.replace_parameters({key: sharded_parameters[name] for key, name in names.items()})
    sharded = scores()
    if rank == 0:
        torch.save({"whole": whole, "sharded": sharded}, f"{folder}/importance.pt")
    torch.distributed.barrier()  # no process leaves while another still talks to it
    torch.distributed.destroy_process_group()


def test_unit_importance_and_fisher_per_unit_on_shards_equal_the_whole_model(tmp_path):
    spawn(_importance_worker, (free_port(), str(tmp_path)))
    saved = torch.load(tmp_path / "importance.pt")
    (importance, fisher), (sharded_importance, sharded_fisher) = saved["whole"], saved["sharded"]
    assert importance.shape == (2, 4 + 72) and fisher.abs().sum() > 0
    torch.testing.assert_close(sharded_importance, importance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sharded_fisher, fisher, rtol=1e-5, atol=1e-12)
