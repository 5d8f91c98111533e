"""A trained run, reused: ``python -m subnets.evaluate``, ``python -m subnets.parse`` and
``subnets.load_run``."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from conftest import SCORER, hashes, official_scorer, tiny_config, ud_job
from helpers import python

from subnets import load_run
from subnets.data import read_conllu
from subnets.runs.trained import evaluate_run
from subnets.training.runner import run

METHODS = {
    # forward gates at evaluation, so that each language's subnetwork changes the predictions
    "static": ["+method=static", "method.apply=both", "masks.finetune_steps=2", "masks.selection=top_k",
               "masks.top_k=4"],
    "dynamic": ["+method=dynamic", "dynamic.update_every=4", "method.apply=both"],
    "learned": ["+method=dynamic", "dynamic.rule=learned", "dynamic.update_every=4"],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished tiny runs of three methods, by name: (folder, results)."""
    out = {}
    for name, overrides in METHODS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, run(tiny_config(*overrides), folder)
    return out


def scores(results: dict) -> dict:
    """Everything an evaluation reproduces: the scores and the policy's figures."""
    return {k: v for k, v in results.items()
            if k not in ("seconds", "evaluated", "diverging_log_intervals", "status")}  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_evaluating_a_run_on_its_own_languages_reproduces_it_and_changes_none_of_its_files(runs, method):
    folder, results = runs[method]
    before = hashes(folder, skip="evaluations")
    evaluated = evaluate_run(folder)
    assert scores(evaluated) == scores(results)
    assert hashes(folder, skip="evaluations") == before
    output = folder / "evaluations" / "default"
    written = sorted(
        p.relative_to(output / "predictions") for p in (output / "predictions").rglob("*.conllu")
    )
    assert len(written) == 18  # 7 languages and 2 few-shot targets, each with its gold subset
    for name in written:
        assert (output / "predictions" / name).read_bytes() == (folder / "predictions" / name).read_bytes()


def cli(module, *args, cwd):
    """``python -m module args``, in a process that need not import the library again (helpers.python)."""
    return python(module, *args, cwd=cwd, env={"WANDB_MODE": "disabled"})


def test_evaluate_command_on_a_new_language_and_other_fewshot_settings(runs, tmp_path):
    folder, results = runs["static"]
    before = hashes(folder, skip="evaluations")
    done = cli("subnets.evaluate", f"run={folder}", "+languages.synthetic.languages.syn_new={order:OSV}",
               "languages.target=[syn_new]", "fewshot.k=3", "fewshot.repetitions=3", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert hashes(folder, skip="evaluations") == before
    [output] = (folder / "evaluations").glob("+languages*")
    evaluated = json.loads((output / "results.json").read_text())
    assert list(evaluated["target"]) == ["syn_new"] and evaluated["source"] == results["source"]
    fewshot = evaluated["fewshot"]
    assert (fewshot["k"], fewshot["repetitions"], len(fewshot["languages"]["syn_new"]["runs"])) == (3, 3, 3)
    assert "syn_new" in done.stdout.splitlines()[-3]  # the results table, then where it went
    assert (
        done.stdout.splitlines()[-1].startswith("evaluated ") and str(output / "results.json") in done.stdout
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["train.lr_head=3"], "train.lr_head: not a setting an evaluation can change"),
     (["languages.train=[syn_svo]"], "languages.train: not a setting"),
     (["fewshot.kk=3"], "fewshot.kk: no such setting"),
     (["fewshot.k=0"], "fewshot.k=0: expected a positive number"),
     (["checkpoint=first"], "checkpoint='first': expected one of best, last")],
)  # fmt: skip
def test_evaluate_refuses_what_it_cannot_do_naming_the_setting(runs, tmp_path, arguments, message):
    folder, _ = runs["static"]
    done = cli("subnets.evaluate", f"run={folder}", *arguments, cwd=tmp_path)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_unfinished_runs_and_folders_without_a_run_are_refused(runs, tmp_path):
    folder, _ = runs["static"]
    unfinished = tmp_path / "unfinished"
    subprocess.run(["cp", "-r", str(folder), str(unfinished)], check=True)
    (unfinished / "results.json").unlink()
    with pytest.raises(ValueError, match=r"is unfinished \(no results.json\).*checkpoint=last"):
        load_run(unfinished)
    assert load_run(unfinished, "last").step == 12
    with pytest.raises(FileNotFoundError, match="holds no run of subnets"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_run(tmp_path / "missing")


# ---------------------------------------------------------------- parsing
@pytest.mark.skipif(not SCORER.exists(), reason=f"the official scorer is not at {SCORER}")
def test_parsed_conllu_is_scored_by_the_official_scorer_as_the_run_scored_it(runs, tmp_path):
    folder, results = runs["static"]
    gold = folder / "data" / "syn_vos" / "test.conllu"
    output = tmp_path / "parsed.conllu"
    done = cli("subnets.parse", f"run={folder}", f"input={gold}", f"output={output}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scorer = official_scorer()
    official = scorer.evaluate(scorer.load_conllu_file(str(gold)), scorer.load_conllu_file(str(output)))
    assert 100 * official["LAS"].f1 == pytest.approx(results["target"]["syn_vos"]["las"], abs=1e-9)
    assert 100 * official["UAS"].f1 == pytest.approx(results["target"]["syn_vos"]["uas"], abs=1e-9)


SENTENCE = """# sent_id = s1
# a free-form comment
1-2\tdel\t_\t_\t_\t_\t_\t_\t_\t_
1\tde\tde\tADP\tP\t_\t_\t_\t_\tSpaceAfter=No
2\tel\tel\tDET\tD\tDefinite=Def\t_\t_\t_\t_
2.1\tvoy\tir\tVERB\t_\t_\t_\t_\t0:root\t_
3\tperro\tperro\tNOUN\tN\t_\t_\t_\t_\tGloss=dog|X=a=b

"""


def test_parsing_conllu_fills_heads_and_relations_and_keeps_every_other_byte(runs, tmp_path):
    folder, _ = runs["static"]
    path = tmp_path / "in.conllu"
    path.write_text(SENTENCE)
    output = load_run(folder).parse_file(path, tmp_path / "out.conllu", language="syn_svo")
    lines = output.read_text().split("\n")
    original = SENTENCE.split("\n")
    assert len(lines) == len(original)
    for old, new in zip(original, lines):
        old_columns, new_columns = old.split("\t"), new.split("\t")
        if len(old_columns) == 10 and old_columns[0].isdigit():
            assert old_columns[:6] + old_columns[8:] == new_columns[:6] + new_columns[8:]
            assert new_columns[6].isdigit() and new_columns[7] != "_"
        else:
            assert old == new
    [sentence] = read_conllu(output).examples  # a valid tree: one root, no cycle
    assert sentence.heads.count(0) == 1


def test_parsing_text_gives_one_tree_per_line(runs, tmp_path):
    folder, _ = runs["static"]
    path = tmp_path / "in.txt"
    path.write_text("wino lue jejole qexy\n\n  lue qexy   wino \n")
    output = tmp_path / "out.conllu"
    done = cli("subnets.parse", f"run={folder}", f"input={path}", f"output={output}", "language=syn_sov",
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    sentences = read_conllu(output).examples
    assert [s.forms for s in sentences] == [["wino", "lue", "jejole", "qexy"], ["lue", "qexy", "wino"]]
    assert [s.sent_id for s in sentences] == ["1", "3"]  # line numbers


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "input=.*: no such file"), ("", "the file is empty"),
     ("1\tde\t_\t_\n", r"in.txt:1 \(sentence #1\): expected 10 tab-separated columns, found 4")],
)  # fmt: skip
def test_parse_refuses_bad_input_naming_the_file_and_line(runs, tmp_path, content, message):
    folder, _ = runs["static"]
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_text(content)
    done = cli("subnets.parse", f"run={folder}", f"input={path}", f"output={tmp_path / 'out.conllu'}",
               "format=conllu" if content and "\t" in content else "format=auto", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "out.conllu").exists()


def test_the_language_picks_its_subnetwork_and_unseen_ones_follow_the_test_time_policy(runs, monkeypatch):
    folder, _ = runs["static"]
    trained = load_run(folder)
    masks = trained.method.policy.masks
    for code in trained.languages:
        assert torch.equal(trained.gates(code), masks[code].unit_mask.float())
    assert trained.gates("xx_unseen") is None  # masks.target_policy=full: every head
    used, applied = [], trained.model.gates.applied

    def record(gates):
        used.append(gates)
        return applied(gates)

    monkeypatch.setattr(trained.model.gates, "applied", record)
    for code in trained.languages:
        trained.parse([["wino", "lue", "jejole", "qexy"]], language=code)
        assert torch.equal(used[-1], masks[code].unit_mask.float())
    assert len({tuple(m.unit_mask.flatten().tolist()) for m in masks.values()}) > 1  # the subnetworks differ
    supported = load_run(folder, overrides=["masks.target_policy=support"])
    with pytest.raises(ValueError, match="pass support=<a file of that language in the task.s format>"):
        supported.gates("xx_unseen")
    support = folder / "data" / "syn_vos" / "train.conllu"
    gates = supported.gates("syn_vos", support=support)
    assert gates.shape == masks["syn_svo"].unit_mask.shape and gates.sum() == masks["syn_svo"].unit_mask.sum()


def test_load_run_in_python_parses_evaluates_and_adapts(runs):
    """README's notebook snippet, and the evaluation and few-shot calls on a loaded run."""
    folder, results = runs["dynamic"]
    trained = load_run(folder)
    parsed = trained.parse([["wino", "lue", "jejole", "qexy"], ["lue", "qexy", "wino"]], language="syn_svo")
    assert [len(s.heads) for s in parsed] == [4, 3] and all(s.heads.count(0) == 1 for s in parsed)
    test = folder / "data" / "syn_vos" / "test.conllu"
    assert trained.evaluate(test, language="syn_vos") == {
        k: v for k, v in results["target"]["syn_vos"].items() if k != "split"
    }
    adapted = trained.few_shot(test, language="syn_vos", support_pool=folder / "data" / "syn_vos" / "train.conllu",
                               k=5, repetitions=2)  # fmt: skip
    expected = results["fewshot"]["languages"]["syn_vos"]
    assert adapted["languages"]["syn_vos"]["las_mean"] == pytest.approx(expected["las_mean"], abs=1e-9)


def test_a_run_of_a_saved_model_is_reloaded_from_its_folder_and_checked(tmp_path):
    from subnets.models.encoder import build_tiny_transformer, train_subword_tokenizer

    def save_model(seed, vocabulary):
        tokenizer = train_subword_tokenizer([vocabulary] * 3, 400, 64)
        transformer = build_tiny_transformer(len(tokenizer), 32, 2, 4, 64, 64, seed=seed, pad_token_id=0)
        transformer.save_pretrained(tmp_path / "model")
        tokenizer.save_pretrained(tmp_path / "model")

    save_model(0, "wino lue jejole qexy")
    folder = tmp_path / "run"
    results = run(tiny_config(f"model.name_or_path={tmp_path / 'model'}", "train.steps=4"), folder)
    assert scores(evaluate_run(folder))["target"] == results["target"]
    save_model(1, "wino lue jejole qexy")  # other weights, same tokenizer: the checkpoint replaces them
    assert load_run(folder).step == 4
    save_model(0, "entirely other words here")  # another tokenizer
    with pytest.raises(ValueError, match=r"its (config and )?tokenizer differs? from what run="):
        load_run(folder)


def test_a_run_is_evaluated_on_another_ud_root_with_only_a_new_language(tmp_path, ud_root):
    run(ud_job(ud_root), tmp_path / "run")
    other = tmp_path / "other"
    other.mkdir()
    (ud_root / "syn_sov_an").rename(other / "syn_sov_an")  # a root holding only a language the run never saw
    evaluated = evaluate_run(tmp_path / "run", [f"languages.ud_root={other}", "languages.dev=[]",
                                                "languages.target=[syn_sov_an]"])  # fmt: skip
    assert (
        evaluated["source"] == {} and evaluated["dev"] == {} and list(evaluated["target"]) == ["syn_sov_an"]
    )
    assert list(evaluated["fewshot"]["languages"]) == ["syn_sov_an"]


def test_export_writes_a_transformer_folder_a_task_head_and_the_subnetwork_set(runs, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from subnets.hf import SubnetworkModel
    from subnets.hf.prune import load_pruned

    folder, _ = runs["static"]
    trained = load_run(folder)
    language = trained.languages[0]
    done = cli(
        "subnets.export",
        f"run={folder}",
        f"output={tmp_path / 'export'}",
        f"language={language}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    transformer = transformers.AutoModel.from_pretrained(tmp_path / "export").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    inputs = tokenizer(["a b c d", "e f"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trained.model.encoder.transformer(**inputs).last_hidden_state
        torch.testing.assert_close(transformer(**inputs).last_hidden_state, expected, rtol=0, atol=0)
        with trained.model.gates.applied(trained.gates(language)):
            gated = trained.model.encoder.transformer(**inputs).last_hidden_state
        model = SubnetworkModel.from_pretrained(transformer, str(tmp_path / "export" / "subnetworks"))
        with model.language(language):
            torch.testing.assert_close(model(**inputs).last_hidden_state, gated, rtol=0, atol=0)
    assert not torch.equal(gated, expected)  # the subnetwork gates the forward (method.apply=both)
    pruned = load_pruned(tmp_path / "export" / f"pruned-{language}")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).last_hidden_state, gated, rtol=1e-5, atol=1e-5)
    counts = dict(line.split(": ") for line in done.stdout.splitlines() if "parameters" in line)
    before, after = int(counts["parameters_before_pruning"]), int(counts["parameters_after_pruning"])
    assert before == sum(p.numel() for p in trained.model.encoder.transformer.parameters())
    assert after == sum(p.numel() for p in pruned.parameters())
    assert after < before
    for code in trained.languages:
        assert torch.equal(model.masks[code].unit_mask, trained.method.policy.masks[code].unit_mask)
    head = load_file(tmp_path / "export" / "task_head.safetensors")
    state = trained.model.state_dict()
    assert head and all(torch.equal(tensor, state[name]) for name, tensor in head.items())
    assert set(head) | {n for n in state if n.startswith("encoder.transformer.")} == set(state)
    assert model.subnetwork_config.rule == "static" and model.subnetwork_config.apply == "both"
    refused = cli("subnets.export", f"run={folder}", f"output={folder / 'inside'}", cwd=tmp_path)
    assert refused.returncode == 1 and "is inside run=" in refused.stderr and not (folder / "inside").exists()
