"""Nothing lost, nothing wrong in silence: what ``subnets.predict``, ``subnets.export``,
``subnets.evaluate`` and checkpoint writes do with an output that already exists, and with a
write that fails."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading

import pytest
import torch
from conftest import hashes, tiny_config
from helpers import python

from subnets import load_run
from subnets.training.runner import run

RUNS = {
    "static": ["+method=static", "masks.finetune_steps=2"],  # method.apply=gradient (the default)
    "lora": ["+method=lora"],
    "qwen2": ["model=tiny_qwen2", "+method=static", "masks.finetune_steps=2"],  # grouped-query heads
    "language_lora": ["+method=language_lora"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: the folder of a finished tiny run of :data:`RUNS` (trained on first use)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            run(tiny_config(*RUNS[name]), made[name])
        return made[name]

    return get


def cli(module, *args, cwd):
    """``python -m module args``, in a process that need not import the library again (helpers.python)."""
    return python(module, *args, cwd=cwd, env={"WANDB_MODE": "disabled"})


def hidden_states(transformer, tokenizer):
    inputs = tokenizer(["wino lue jejole qexy", "lue qexy"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return transformer(**inputs).last_hidden_state


# ---------------------------------------------------------------- predict (1)
def test_predict_writes_through_a_fifo_and_a_symlink_and_keeps_both_nodes(runs, tmp_path):
    trained = load_run(runs("static"))
    source = tmp_path / "in.txt"
    source.write_text("wino lue jejole qexy\n")
    expected = trained.predict_file(source, tmp_path / "plain.conllu").read_text()
    target = tmp_path / "target.conllu"
    target.write_text("old\n")
    link = tmp_path / "link.conllu"
    link.symlink_to(target)
    trained.predict_file(source, link)
    assert link.is_symlink() and target.read_text() == expected  # the link is kept, its target written
    to_null = tmp_path / "null.conllu"
    to_null.symlink_to(os.devnull)
    trained.predict_file(source, to_null)
    assert to_null.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = tmp_path / "fifo.conllu"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    trained.predict_file(source, fifo)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and received == [expected]


# ---------------------------------------------------------------- export (2, 4, 10)
def test_export_refuses_a_folder_it_did_not_write_even_with_overwrite(runs, tmp_path):
    from subnets.hf.export import export_run

    output = tmp_path / "mine"
    output.mkdir()
    for name, text in {"config.json": "{}", "task_head.json": '{"mine": 1}', "model.safetensors.index.json": "{}",
                       "model-00001-of-00002.safetensors": "x"}.items():  # fmt: skip
        (output / name).write_text(text)
    before = hashes(output)
    done = cli("subnets.export", f"run={runs('static')}", f"output={output}", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.startswith(f"error: output={output} is not empty")
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="not empty and holds no export"):
        export_run(runs("static"), output, overwrite=True)
    assert hashes(output) == before and sorted(os.listdir(tmp_path)) == ["mine"]


def test_export_replaces_its_own_earlier_export_whole_only_with_overwrite(runs, tmp_path):
    import transformers

    from subnets.hf.export import export_run

    output = tmp_path / "export"
    export_run(runs("static"), output)
    assert (output / "subnetworks").is_dir()
    transformer, info = transformers.AutoModel.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the pooler is in the folder
    trained = load_run(runs("static"))
    torch.testing.assert_close(hidden_states(transformer.eval(), trained.tokenizer),
                               hidden_states(trained.model.encoder.transformer, trained.tokenizer), rtol=0, atol=0)  # fmt: skip
    untrained = json.loads((output / "task_head.json").read_text())["untrained"]
    assert sorted(untrained["parameters"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    before = hashes(output)
    with pytest.raises(ValueError, match=r"holds an earlier export .*overwrite=true"):
        export_run(runs("lora"), output)
    assert hashes(output) == before
    export_run(runs("lora"), output, overwrite=True)  # a run without subnetworks
    assert not (output / "subnetworks").exists()
    assert json.loads((output / "task_head.json").read_text())["config"]["method"]["name"] == "lora"
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        export_run(runs("static"), output, overwrite=True)
    assert (output / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left


def test_an_export_that_fails_midway_leaves_nothing(runs, tmp_path, monkeypatch):
    import subnets.hf.export

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(subnets.hf.export, "save_safetensors", fail)
    with pytest.raises(OSError, match="No space left"):
        subnets.hf.export.export_run(runs("static"), tmp_path / "export")
    assert os.listdir(tmp_path) == []


def test_export_refuses_any_training_run_folder(runs, tmp_path):
    from subnets.hf.export import export_run

    other = runs("lora")
    before = hashes(other)
    with pytest.raises(ValueError, match=f"output={other} is the folder of a training run"):
        export_run(runs("static"), other)
    assert hashes(other) == before


# ---------------------------------------------------------------- export with language= (3, 9)
def test_export_refuses_unprunable_heads_before_writing_anything(runs, tmp_path):
    from subnets.hf.export import export_run

    with pytest.raises(ValueError, match="grouped-query"):
        export_run(runs("qwen2"), tmp_path / "export", language="syn_svo", force=True)
    assert os.listdir(tmp_path) == []


def test_pruning_a_gradient_run_needs_force_and_reports_its_difference(runs, tmp_path, caplog):
    from subnets.hf.export import export_run

    with pytest.raises(ValueError, match=r"method.apply=gradient.*force=true"):
        export_run(runs("static"), tmp_path / "export", language="syn_svo")
    assert os.listdir(tmp_path) == []
    with caplog.at_level(logging.WARNING, logger="subnets.hf.export"):
        written = export_run(runs("static"), tmp_path / "export", language="syn_svo", force=True)
    difference = written["pruned_max_difference"]
    assert difference > 1e-3 and f"{difference:.3g}" in caplog.text
    assert (tmp_path / "export" / "pruned-syn_svo").is_dir()


# ---------------------------------------------------------------- export of LoRA runs (8)
def test_a_lora_run_exports_its_merged_transformer(runs, tmp_path):
    import transformers

    from subnets.hf.export import export_run

    export_run(runs("lora"), tmp_path / "export")
    transformer, info = transformers.AutoModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = load_run(runs("lora"))
    exported = hidden_states(transformer.eval(), trained.tokenizer)
    torch.testing.assert_close(exported, hidden_states(trained.model.encoder.transformer, trained.tokenizer),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="language_lora"):
        export_run(runs("language_lora"), tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["export"]


# ---------------------------------------------------------------- evaluate (5)
def test_evaluate_refuses_an_output_holding_another_runs_evaluation(runs, tmp_path):
    from subnets.runs.trained import evaluate_run

    output = tmp_path / "evaluation"
    evaluate_run(runs("static"), output=output)
    evaluate_run(runs("static"), output=output)  # the same evaluation again: replaced
    (output / "predictions" / "stale.conllu").write_text("stale\n")
    before = hashes(output)
    done = cli("subnets.evaluate", f"run={runs('lora')}", f"output={output}", cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert f"holds the evaluation of run={runs('static')}" in done.stderr and "overwrite=true" in done.stderr
    assert hashes(output) == before
    evaluate_run(runs("lora"), output=output, overwrite=True)
    results = json.loads((output / "results.json").read_text())
    assert results["evaluated"]["run"] == str(runs("lora")) and results["method"] == "lora"
    assert not (output / "predictions" / "stale.conllu").exists()


# ---------------------------------------------------------------- checkpoints (6, 7)
def test_a_run_start_removes_the_stale_temporary_files_of_killed_writes_only(tmp_path):
    from subnets.runs.folder import RunFolder

    stale = [
        tmp_path / "checkpoints" / ".last.safetensors.a1b2c3d_.tmp",
        tmp_path / ".results.json.zz99yy88.tmp",
    ]
    kept = [tmp_path / "checkpoints" / "last.safetensors", tmp_path / "notes.tmp", tmp_path / ".x.tmp",
            tmp_path / ".results.json.short.tmp", tmp_path / "busy" / ".run.json.abcdefgh.tmp"]  # fmt: skip
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".lock").write_text("")  # a folder another command holds (an evaluation)
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    with RunFolder(tmp_path).lock():
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in kept)


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    import safetensors.torch
    from safetensors import SafetensorError

    from subnets.runs.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.safetensors"
    save_checkpoint(path, {"step": 4, "weight": torch.ones(3)})
    before = path.read_bytes()

    def full(*args, **kwargs):
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        save_checkpoint(path, {"step": 8, "weight": torch.zeros(3)})
    assert str(path) in str(raised.value) and "intact" in str(raised.value)
    assert len(str(raised.value).splitlines()) == 1
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 4
    assert os.listdir(path.parent) == ["last.safetensors"]
