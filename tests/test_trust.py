"""Runs whose results do not depend on how they got there, run folders that never mix data or
models, settings checked before any work, input and output the official scorer agrees with.
Each test is a case an audit found failing (issue 12)."""

import json
import os

import pytest
import torch
from conftest import SCORER, TINY, hashes, official_scorer, scores, tiny_config, ud_job
from helpers import python

from subnets.config import SettingError
from subnets.data.treebank import ConlluError, read_conllu
from subnets.files import read_jsonl
from subnets.runs.checkpoint import load_checkpoint
from subnets.training.runner import Run, run

STATIC = ["+method=static", "masks.finetune_steps=5", "masks.importance_batches=2", "masks.batch_size=4",
          "masks.selection=keep_ratio"]  # fmt: skip


class Crash(RuntimeError):
    pass


def crash_before_first_checkpoint(monkeypatch, cfg, folder):
    """Run ``cfg`` until it would write its first checkpoint (masks are written by then)."""

    def crash(self):
        raise Crash("killed before the first checkpoint")

    original = Run.save_checkpoint
    monkeypatch.setattr(Run, "save_checkpoint", crash)
    with pytest.raises(Crash):
        run(cfg, folder)
    monkeypatch.setattr(Run, "save_checkpoint", original)


# ---------------------------------------------------------------- randomness of phases
@pytest.mark.parametrize("method", [STATIC, [*STATIC[1:], "+method=dynamic", "dynamic.init=static"]],
                         ids=["static", "dynamic_init_static"])  # fmt: skip
def test_computed_loaded_and_resumed_masks_give_identical_runs(tmp_path, monkeypatch, method):
    reference = run(tiny_config(*method), tmp_path / "reference")
    crash_before_first_checkpoint(monkeypatch, tiny_config(*method), tmp_path / "killed")
    assert (tmp_path / "killed" / "masks" / "masks.safetensors").exists()
    resumed = run(tiny_config(*method), tmp_path / "killed")  # masks loaded from the cache
    assert scores(resumed) == scores(reference)
    # A dynamic run's masks/masks.safetensors holds its final masks; the static search's are its initial ones.
    if method is not STATIC:
        run(tiny_config(*STATIC), tmp_path / "static")
    saved = tmp_path / ("reference" if method is STATIC else "static") / "masks" / "masks.safetensors"
    loaded = run(tiny_config(*method, f"masks.path={saved}"), tmp_path / "loaded")
    assert scores(loaded) == scores(reference)


# ---------------------------------------------------------------- run folder identity
def test_other_data_under_the_same_root_is_refused_and_the_folder_left_as_it_was(tmp_path, ud_root):
    folder = tmp_path / "run"
    first = run(ud_job(ud_root), folder)
    before = hashes(folder)
    train = ud_root / "syn_svo" / "train.conllu"
    train.write_text(train.read_text().replace("\tnsubj\t", "\tobj\t", 1))
    with pytest.raises(ValueError, match=r"data: syn_svo/train.conllu has other content"):
        run(ud_job(ud_root), folder)
    refused = hashes(folder)
    assert (
        refused.pop("train.log") != before["train.log"]
    )  # the error is added to the log, nothing else changes
    assert "data: syn_svo/train.conllu has other content" in (folder / "train.log").read_text()
    assert refused == {k: v for k, v in before.items() if k != "train.log"}
    # the same content elsewhere is the same run: found finished, not run again
    moved = tmp_path / "moved"
    os.rename(ud_root, moved)
    train = moved / "syn_svo" / "train.conllu"
    train.write_text(train.read_text().replace("\tobj\t", "\tnsubj\t", 1))
    assert run(ud_job(moved), folder) == first
    after = hashes(folder)
    assert after.pop("train.log") != before.pop("train.log")  # it logs that the run had finished
    assert after == before and "already finished" in (folder / "train.log").read_text()


def save_tiny_model(folder, seed):
    from subnets.models.encoder import build_tiny_transformer, train_subword_tokenizer

    tokenizer = train_subword_tokenizer(["a b c d e"] * 3, 400, 64)
    transformer = build_tiny_transformer(len(tokenizer), 32, 2, 4, 64, 64, seed=seed, pad_token_id=0)
    transformer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_another_model_at_the_same_path_is_refused(tmp_path):
    model = tmp_path / "model"
    save_tiny_model(model, seed=0)
    job = [f"model.name_or_path={model}", "fewshot.repetitions=0", "train.steps=4"]
    run(tiny_config(*job), tmp_path / "run")
    save_tiny_model(model, seed=1)  # other weights, same folder
    with pytest.raises(ValueError, match="model: other weights"):
        run(tiny_config(*job), tmp_path / "run")


def cli(*args, cwd):
    """``python -m subnets.train debug=tiny args`` (helpers.python)."""
    return python("subnets.train", *TINY, *args, cwd=cwd, env={"WANDB_MODE": "disabled"})


def test_a_refused_command_rewrites_nothing_in_the_folder(tmp_path):
    folder = tmp_path / "run"
    assert cli(f"hydra.run.dir={folder}", cwd=tmp_path).returncode == 0
    before = hashes(folder)
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before
    refused = cli(f"hydra.run.dir={folder}", "train.lr_head=0.5", cwd=tmp_path)
    assert refused.returncode != 0 and "train.lr_head: 0.002 -> 0.5" in refused.stderr
    after = hashes(folder)
    log = after.pop("train.log"), before.pop("train.log")  # the error is appended to the log
    assert after == before, log


def test_overwrite_checks_everything_before_it_deletes_anything(tmp_path):
    folder = tmp_path / "run"
    run(tiny_config(), folder)
    before = hashes(folder)
    with pytest.raises(OSError, match="model.name_or_path"):
        run(tiny_config("overwrite=true", f"model.name_or_path={tmp_path / 'no-such-model'}"), folder)
    with pytest.raises(SettingError, match="masks.keep_ratio"):
        run(tiny_config("overwrite=true", "masks.keep_ratio=1.5"), folder)
    after = hashes(folder)
    assert after.pop("train.log") != before.pop("train.log")  # the two errors are added to the log
    assert after == before and "masks.keep_ratio=1.5" in (folder / "train.log").read_text()


# ---------------------------------------------------------------- settings, checked at start
@pytest.mark.parametrize(
    "setting,named",
    [
        ("fewshot.k=0", "fewshot.k=0: expected a positive number"),
        ("fewshot.max_tokens=0", "fewshot.max_tokens=0: expected a positive number of subwords"),
        ("masks.keep_ratio=1.5", "masks.keep_ratio=1.5: expected in (0, 1]"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0"),
        ("train.eval_every=0", "train.eval_every=0"),
        ("train.log_every=0", "train.log_every=0"),
        ("train.steps=-5", "train.steps=-5"),
        ("languages.max_eval_sentences=-1", "languages.max_eval_sentences=-1"),
        ("masks.path=x.safetensors", "masks.path='x.safetensors' is not used by method baseline"),
        ("+method=dynamic masks.path=x.safetensors", "is not used by method dynamic"),
        ("+method=static masks.selection=top_k masks.top_k=99", "masks.top_k=99: expected between 2"),
        ("+method=static masks.min_heads_per_layer=5", "masks.min_heads_per_layer=5: the model has 4 heads"),
    ],
)
def test_invalid_settings_fail_at_start_naming_the_key(tmp_path, setting, named):
    with pytest.raises(SettingError) as error:
        run(tiny_config(*setting.split()), tmp_path)
    assert named in str(error.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run.json").exists()


def test_skip_mode_covers_the_support_split_and_counts_it(tmp_path, monkeypatch):
    from subnets.data import synthetic

    original = synthetic.generate_treebank

    def corrupt(lang, lexicon, size, seed, split):  # a bad sentence in a target's train split
        text = original(lang, lexicon, size, seed, split)
        return (
            text.replace("\t0\troot\t", "\t99\troot\t", 1)
            if (lang.code, split) == ("syn_vos", "train")
            else text
        )

    monkeypatch.setattr(synthetic, "generate_treebank", corrupt)
    results = run(tiny_config("languages.on_error=skip"), tmp_path)
    assert results["skipped_sentences"] == {"syn_vos-train": 1}
    assert results["fewshot"]["languages"]["syn_vos"]["support_split"] == "train"


# ---------------------------------------------------------------- input
def write(path, data: bytes):
    path.write_bytes(data)
    return path


SENTENCE = (
    "# sent_id = a\n1\tdogs\tdog\tNOUN\t_\t_\t2\tnsubj\t_\t_\n2\tbark\tbark\tVERB\t_\t_\t0\troot\t_\t_\n\n"
)


def test_byte_order_mark_is_accepted(tmp_path):
    parsed = read_conllu(write(tmp_path / "bom.conllu", b"\xef\xbb\xbf" + SENTENCE.encode()))
    assert parsed.examples[0].forms == ["dogs", "bark"] and parsed.examples[0].sent_id == "a"


def test_undecodable_bytes_name_the_file_and_line(tmp_path):
    path = write(
        tmp_path / "latin1.conllu", SENTENCE.encode() + "# sent_id = b\n1\tcaf\xe9\t_\tNOUN".encode("latin-1")
    )
    with pytest.raises(ConlluError, match=r"latin1.conllu:6: bytes b'\\xe9' are not UTF-8"):
        read_conllu(path)


def test_empty_form_is_refused(tmp_path):
    path = write(tmp_path / "empty.conllu", SENTENCE.replace("\tdogs\t", "\t\t").encode())
    with pytest.raises(ConlluError, match=r"empty.conllu:2 \(sentence a\): empty FORM"):
        read_conllu(path)


# ---------------------------------------------------------------- output and the official scorer
@pytest.mark.skipif(not SCORER.exists(), reason=f"the official scorer is not at {SCORER}")
def test_predictions_carry_no_unpredicted_gold_and_the_official_scorer_agrees(tmp_path):
    results = run(tiny_config("languages.max_eval_sentences=25"), tmp_path)
    scorer = official_scorer()
    checked = 0
    for role in ("source", "dev", "target"):
        for code, measured in results[role].items():
            prediction = tmp_path / "predictions" / f"{code}-{measured['split']}.conllu"
            for line in prediction.read_text().splitlines():
                if line and not line.startswith("#"):
                    columns = line.split("\t")
                    no_gold = [columns[i] for i in (2, 3, 4, 5, 8)]  # LEMMA, UPOS, XPOS, FEATS, DEPS
                    assert no_gold == ["_"] * 5
            official = scorer.evaluate(scorer.load_conllu_file(str(prediction.with_suffix(".gold.conllu"))),
                                       scorer.load_conllu_file(str(prediction)))  # fmt: skip
            assert 100 * official["UAS"].f1 == pytest.approx(measured["uas"], abs=1e-9)
            assert 100 * official["LAS"].f1 == pytest.approx(measured["las"], abs=1e-9)
            checked += 1
    assert checked == 7
    # few-shot predictions: the test set without the support sentences, and its gold subset
    prediction = tmp_path / "predictions" / "fewshot" / "syn_vos-test.conllu"
    gold = scorer.load_conllu_file(str(prediction.with_suffix(".gold.conllu")))
    official = scorer.evaluate(gold, scorer.load_conllu_file(str(prediction)))
    first = results["fewshot"]["languages"]["syn_vos"]["runs"][0]
    assert 100 * official["LAS"].f1 == pytest.approx(first["las"], abs=1e-9)
    assert official["Words"].gold_total == first["words"]


# ---------------------------------------------------------------- files
def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    crash_before_first_checkpoint(monkeypatch, tiny_config(), tmp_path)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r] == [3]
    run(tiny_config(), tmp_path)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r] == [3, 6, 9, 12]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run(tiny_config("fewshot.repetitions=0", "train.steps=4"), tmp_path)
    finally:
        os.umask(old)
    for name in (
        "results.json",
        "run.json",
        "checkpoints/last.safetensors",
        "predictions/syn_vos-test.conllu",
    ):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_identical_runs_write_identical_checkpoint_and_mask_bytes(tmp_path):
    for name in ("a", "b"):
        run(tiny_config(*STATIC, "fewshot.repetitions=0"), tmp_path / name)
    for name in ("checkpoints/last.safetensors", "checkpoints/best.safetensors", "masks/masks.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")["step"] == 12


def test_files_of_the_earlier_format_still_load(tmp_path):
    """Checkpoints and mask sets written before the header became one metadata entry."""
    from safetensors.torch import save_file

    from subnets.masks.subnetwork import SubnetworkSet

    path = tmp_path / "old.safetensors"
    save_file({"t0": torch.ones(2)}, path, metadata={"format": "subnets-checkpoint-1",
                                                     "state": json.dumps({"x": {"__tensor__": "t0"}, "step": 3})})  # fmt: skip
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["x"], torch.ones(2))
    masks = tmp_path / "masks.safetensors"
    save_file({"en/heads": torch.ones(2, 4, dtype=torch.uint8)}, masks,
              metadata={"format": "subnets-masks-1", "num_layers": "2", "num_heads": "4",
                        "languages": '["en"]', "param_shapes": "{}"})  # fmt: skip
    assert SubnetworkSet.load(masks)["en"].num_units_kept == 8
