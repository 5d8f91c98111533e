"""The runner in process: outputs, checkpoints, resume, config errors."""

import copy
import json

import pytest
import torch
from conftest import crash_after_checkpoint, scores, tiny_config
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from subnets.evaluate.results import few_shot_results
from subnets.files import read_jsonl
from subnets.metrics import score_conllu
from subnets.runs.checkpoint import load_checkpoint
from subnets.training.runner import Run, run


def test_run_writes_every_output(tmp_path):
    results = run(tiny_config(), tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    evaluated = {("source", c) for c in ["syn_svo", "syn_sov", "syn_vso", "syn_osv"]}
    evaluated |= {("dev", "syn_svo_na"), ("target", "syn_vos"), ("target", "syn_sov_an")}
    assert {(role, code) for role in ("source", "dev", "target") for code in results[role]} == evaluated
    for role, code in evaluated:
        scores = results[role][code]
        split = scores["split"]
        gold = tmp_path / "data" / code / f"{split}.conllu"
        predicted = tmp_path / "predictions" / f"{code}-{split}.conllu"
        # predictions are valid CoNLL-U trees, and rescoring them reproduces results.json
        rescored = score_conllu(gold, predicted)
        assert rescored["words"] == scores["words"]
        assert rescored["las"] == pytest.approx(scores["las"])
        assert rescored["uas"] == pytest.approx(scores["uas"])
    assert results["target_mean"]["las"] == pytest.approx(
        (results["target"]["syn_vos"]["las"] + results["target"]["syn_sov_an"]["las"]) / 2
    )
    source_las = {code: scores["las"] for code, scores in results["source"].items()}
    assert results["source_mean"]["las"] == pytest.approx(sum(source_las.values()) / 4)
    best = max(source_las, key=source_las.get)
    assert results["source_best"] == {
        "language": best,
        **{k: results["source"][best][k] for k in ("uas", "las")},
    }
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records if "dev/metric" in r] == [6, 12]
    assert results["best_step"] in (6, 12)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert last["step"] == 12 and last["config"]["train"]["steps"] == 12
    assert set(last) >= {"model", "optimizer", "scheduler", "sampler", "method", "rng", "best"}
    best = load_checkpoint(tmp_path / "checkpoints" / "best.safetensors")
    assert best["step"] == results["best_step"]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_task_pos_and_parsing_pos(tmp_path):
    pos = run(tiny_config("task=pos"), tmp_path / "pos")
    assert set(pos["source"]["syn_svo"]) == {"split", "words", "upos"}
    both = run(tiny_config("task=parsing_pos"), tmp_path / "both")
    assert {"uas", "las", "upos"} <= set(both["source"]["syn_svo"])


def test_same_seed_same_result_other_seed_other_result(tmp_path):
    first = run(tiny_config("seed=3"), tmp_path / "a")
    second = run(tiny_config("seed=3"), tmp_path / "b")
    other = run(tiny_config("seed=4"), tmp_path / "c")
    assert first["source"] == second["source"] and first["target"] == second["target"]
    assert first["source"] != other["source"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    reference = run(tiny_config(), tmp_path / "reference")

    crash_after_checkpoint(monkeypatch, tiny_config(), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.safetensors")["step"] == 8
    resumed = run(tiny_config(), tmp_path / "resumed")

    assert scores(resumed) == scores(reference)
    a = load_checkpoint(tmp_path / "reference/checkpoints/last.safetensors")
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.safetensors")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    # the metrics log holds each step once, as the uninterrupted run's does
    steps = lambda path: [r["step"] for r in read_jsonl(path / "metrics.jsonl")]  # noqa: E731
    assert steps(tmp_path / "resumed") == steps(tmp_path / "reference")


def test_finished_run_is_not_run_again(tmp_path, monkeypatch):
    first = run(tiny_config(), tmp_path)
    monkeypatch.setattr(Run, "train", lambda self: pytest.fail("a finished run was trained again"))
    assert run(tiny_config(), tmp_path) == first


def test_resume_refuses_a_different_config_and_resume_false(tmp_path):
    run(tiny_config(), tmp_path)
    with pytest.raises(ValueError, match=r"train.lr_head: 0.002 -> 0.01"):
        run(tiny_config("train.lr_head=0.01"), tmp_path)
    with pytest.raises(FileExistsError, match="resume=true"):
        run(tiny_config("resume=false"), tmp_path)
    assert (tmp_path / "results.json").exists()  # nothing already written was lost


def test_misspelt_or_mistyped_settings_fail_at_compose():
    with pytest.raises(ConfigCompositionException) as error:
        tiny_config("train.stepz=3")
    assert "stepz" in str(error.value.__cause__ or error.value)
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        tiny_config("train.steps=many")
    assert "train.steps" in str(error.value.__cause__ or error.value)
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        tiny_config("method.apply=sideways")
    assert "forward, gradient, both" in str(error.value.__cause__ or error.value)
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        tiny_config("method=baseline")  # optional groups are appended with +


def test_unknown_language_lists_available(tmp_path):
    with pytest.raises(
        ValueError, match=r"languages.train: unknown language code\(s\) xx_yy.*available: syn_osv"
    ):
        run(tiny_config("languages.train=[syn_svo,xx_yy]"), tmp_path)


def test_a_folder_of_your_own_languages_is_refused_with_how_to_name_them(tmp_path):
    from subnets.data.discovery import select_languages

    available = {"en_ewt": object(), "it_isdt": object()}
    with pytest.raises(ValueError, match=r"syn_svo.*available: en_ewt, it_isdt \(name your folder's languages: "
                       r"languages.train=\[code,...\]"):  # fmt: skip
        select_languages(available, ["syn_svo", "syn_sov"], "languages.train", tmp_path)
    with pytest.raises(ValueError) as partly_known:  # a misspelt code among known ones: no such hint
        select_languages(available, ["en_ewt", "it_isd"], "languages.train", tmp_path)
    assert "name your folder's languages" not in str(partly_known.value)


def test_skip_mode_counts_invalid_sentences(tmp_path):
    experiment = Run(tiny_config("languages.on_error=skip"), tmp_path)
    # corrupt one training sentence of the generated data before it is read
    from subnets.data import synthetic

    original = synthetic.generate_treebank

    def corrupt(lang, lexicon, size, seed, split):
        text = original(lang, lexicon, size, seed, split)
        if lang.code == "syn_svo" and split == "train":
            text = text.replace("\t0\troot\t", "\t99\troot\t", 1)
        return text

    import subnets.data.synthetic as module

    module.generate_treebank = corrupt
    try:
        experiment.setup()
    finally:
        module.generate_treebank = original
        experiment.close()
    assert experiment.data.skipped == {"syn_svo-train": 1}
    assert len(experiment.data.train["syn_svo"]) == 79


def test_keep_optimizer_state_false_drops_it_from_a_finished_runs_checkpoint(tmp_path):
    from subnets.runs.trained import evaluate_run

    kept = run(tiny_config(), tmp_path / "kept")
    dropped = run(tiny_config("train.keep_optimizer_state=false"), tmp_path / "dropped")
    assert scores(dropped) == scores(kept)  # the setting changes no result
    last = "checkpoints/last.safetensors"
    with_state, without = (
        load_checkpoint(tmp_path / "kept" / last),
        load_checkpoint(tmp_path / "dropped" / last),
    )
    assert "optimizer" in with_state and "optimizer" not in without
    assert set(with_state) - set(without) == {"optimizer"}
    assert all(torch.equal(with_state["model"][k], v) for k, v in without["model"].items())
    size = {name: (tmp_path / name / last).stat().st_size for name in ("kept", "dropped")}
    # AdamW keeps two moment tensors the size of every trained parameter
    parameters = sum(v.numel() * v.element_size() for v in with_state["model"].values())
    assert size["kept"] - size["dropped"] > 1.9 * parameters
    # the finished command still answers, and the run is still evaluated as before
    assert run(tiny_config("train.keep_optimizer_state=false"), tmp_path / "dropped") == dropped
    evaluated = evaluate_run(tmp_path / "dropped")
    assert (evaluated["source"], evaluated["fewshot"]) == (dropped["source"], dropped["fewshot"])
    # re-running a finished run's command with the setting drops the state from it too
    run(tiny_config("train.keep_optimizer_state=false"), tmp_path / "kept")
    assert "optimizer" not in load_checkpoint(tmp_path / "kept" / last)
    # a checkpoint without it cannot continue a run that has not finished
    state = load_checkpoint(tmp_path / "dropped" / last)
    state["step"] = 8
    from subnets.runs.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "dropped" / last, state)
    (tmp_path / "dropped" / "results.json").unlink()
    with pytest.raises(ValueError, match="holds no optimizer state.*cannot be continued to train.steps=12"):
        run(tiny_config(), tmp_path / "dropped")


def identical(a, b) -> bool:
    """Nested states equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def test_a_training_state_loads_what_its_state_dict_holds(tmp_path):
    """TrainingState.state_dict / load_state_dict: a second run of the same settings, loaded with the
    first's state after 3 steps, holds the same state (model, optimizer, masks, sampler, guard, step,
    best, generators) and takes the same next step."""
    from subnets.runs.checkpoint import rng_state, set_rng_state
    from subnets.runs.checkpoint_schema import Key

    first, second = (Run(tiny_config("+method=dynamic"), tmp_path / name) for name in ("first", "second"))
    for training in (first, second):
        training.setup()
    for _ in range(3):
        first.train_step()
    first.state.best = {"metric": 12.5, "step": 2}
    saved = copy.deepcopy(first.state.state_dict())  # (a state dict holds the live tensors)
    second.state.load_state_dict(saved, tmp_path / "first" / "last.safetensors", train_steps=12)
    loaded = second.state.state_dict()
    assert (loaded[Key.STEP], loaded[Key.BEST]) == (3, {"metric": 12.5, "step": 2})
    for key in (Key.MODEL, Key.OPTIMIZER, Key.METHOD, Key.SAMPLER, Key.DIVERGENCE, Key.RNG, Key.SCHEDULER):
        assert identical(loaded[key], saved[key]), key
    generators = rng_state()  # (one process: each step draws from the same global generators)
    steps = []
    for training in (first, second):
        set_rng_state(generators)
        steps.append(training.train_step()[0])
    assert steps[0].loss == steps[1].loss and steps[0].language == steps[1].language


@pytest.mark.parametrize("method", ["baseline", "maml"])
def test_frozen_word_embeddings_stay_bit_identical_while_the_rest_learns(tmp_path, method, caplog):
    experiment = Run(
        tiny_config(f"+method={method}", "model.freeze_embeddings=true", "train.steps=30"), tmp_path
    )
    with caplog.at_level("WARNING", logger="subnets.training.runner"):
        experiment.setup()
    assert "freezes its random initial embeddings" in caplog.text  # the tiny model's are random
    embeddings = experiment.model.encoder.transformer.get_input_embeddings().weight
    before = {name: p.detach().clone() for name, p in experiment.model.named_parameters()}
    try:
        experiment.train()
        few_shot_results(experiment.evaluation())
    finally:
        experiment.close()
    name = next(n for n, p in experiment.model.named_parameters() if p is embeddings)
    assert torch.equal(embeddings, before[name]) and not embeddings.requires_grad
    moved = [n for n, p in experiment.model.named_parameters() if not torch.equal(p, before[n])]
    assert name not in moved and len(moved) == len(before) - 1  # every other parameter trained
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_mixed_batches_run_each_language_through_its_subnetwork_and_update_the_union(tmp_path, monkeypatch):
    """train.batches=mixed: a step holds several languages, each part gated by its own language,
    the update mask is the union of theirs, and the same seed gives the same run."""
    from subnets.config import SettingError
    from subnets.masks.subnetwork import SubnetworkSet
    from subnets.training import update

    seen = []
    original = update.training_step

    def spy(model, batch, optimizer, **kwargs):
        parts = batch if isinstance(batch, list) else [batch]
        gates = kwargs.get("gates")
        if isinstance(gates, dict):  # a mixed step: each part's language has its own gates
            assert set(gates) >= {p.lang for p in parts}
            seen.append(([p.lang for p in parts], {lang: None if g is None else g.clone() for lang, g in gates.items()},
                         kwargs.get("update_mask")))  # fmt: skip
        return original(model, batch, optimizer, **kwargs)

    monkeypatch.setattr("subnets.methods.base.training_step", spy)
    overrides = ["+method=static", "method.apply=both", "train.batches=mixed", "masks.selection=top_k",
                 "masks.top_k=3", "train.steps=16"]  # fmt: skip
    results = run(tiny_config(*overrides), tmp_path / "a")
    masks = SubnetworkSet.load(tmp_path / "a" / "masks" / "masks.safetensors")
    assert len(seen) >= 10 and all(len(languages) >= 2 for languages, _, _ in seen)
    languages, gates, union = seen[-1]
    for lang in languages:
        assert torch.equal(gates[lang].cpu().bool(), masks[lang].unit_mask)
    expected = unit_parameter_masks_of(masks, languages, tmp_path / "a")
    assert set(union) == set(expected) and all(torch.equal(union[n].cpu(), expected[n]) for n in expected)
    assert scores(run(tiny_config(*overrides), tmp_path / "b")) == scores(results)
    with pytest.raises(SettingError, match="train.batches=mixed: MAML episodes"):
        run(tiny_config("+method=maml", "train.batches=mixed"), tmp_path / "c")


def unit_parameter_masks_of(masks, languages, folder):
    """The union of ``languages``' update masks, computed from the model of the run in ``folder``."""
    from subnets import load_run
    from subnets.masks.subnetwork import unit_parameter_masks

    model = load_run(folder).model
    union = torch.stack([masks[lang].unit_mask for lang in languages]).any(dim=0)
    return {name: mask.cpu() for name, mask in unit_parameter_masks(model, union).items()}
