"""+method=static end to end: masks found, cached, reused, respected, and used for unseen languages."""

import json

import pytest
import torch
from conftest import crash_after_checkpoint, scores, step_on, tiny_config
from helpers import changed_outside, masked_step

import subnets.methods.static as static
from subnets.masks.subnetwork import MaskMismatchError, SubnetworkSet, unit_parameter_masks
from subnets.methods.static import search_masks
from subnets.training.runner import Run, run

STATIC = ["+method=static", "masks.finetune_steps=5", "masks.importance_batches=2", "masks.batch_size=4"]
KEEP_HALF = [*STATIC, "masks.selection=keep_ratio", "masks.keep_ratio=0.5"]


def test_static_run_writes_masks_and_figure(tmp_path):
    results = run(tiny_config(*STATIC), tmp_path)
    folder = tmp_path / "masks"
    for name in ("masks.safetensors", "summary.json", "overlap.png", "pruning.json"):
        assert (folder / name).stat().st_size > 0, name
    masks = SubnetworkSet.load(folder / "masks.safetensors")
    assert list(masks) == ["syn_svo", "syn_sov", "syn_vso", "syn_osv"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["jaccard"]["languages"] == list(masks)
    assert results["sparsity"] == {lang: pytest.approx(s.sparsity()) for lang, s in masks.items()}
    pruning = json.loads((folder / "pruning.json").read_text())
    for lang, history in pruning.items():
        # iterative pruning kept the last mask at or above 90% of the unpruned dev LAS
        kept = masks[lang].num_units_kept
        accepted = [metric for heads, metric in history["rounds"] if heads == kept]
        assert accepted and accepted[0] >= 0.9 * history["baseline"]
    assert results["source"]["syn_svo"]["las"] >= 0


@pytest.mark.parametrize("mode", ["gradient", "both", "forward"])
def test_heads_outside_a_languages_subnetwork_receive_no_update_from_its_batches(tmp_path, mode):
    experiment = Run(tiny_config(*KEEP_HALF, f"method.apply={mode}"), tmp_path)
    experiment.setup()
    method = experiment.method.policy
    try:
        for _ in range(6):
            lang, owned, before, after = masked_step(experiment)
            if mode == "forward":
                # gated off, the heads get no gradient from the batch (AdamW's decay and
                # momentum from other languages' steps may still move them: not exact)
                assert not any(after[name].grad[~mask].any() for name, mask in owned.items()), lang
            else:
                assert not changed_outside(owned, before, after), lang
            assert any(not torch.equal(after[name][mask], before[name][mask]) for name, mask in owned.items())
            gates = method.gates(lang)
            assert (gates is None) == (mode == "gradient")
    finally:
        experiment.close()


def test_forward_mode_gates_off_heads_outside_the_subnetwork(tmp_path):
    experiment = Run(tiny_config(*KEEP_HALF, "method.apply=forward"), tmp_path)
    experiment.setup()
    try:
        lang = "syn_sov"
        policy = experiment.method.policy
        gates = policy.gates(lang)
        assert torch.equal(gates.bool(), policy.masks[lang].unit_mask)
        assert policy.update_mask(lang) is None
        assert torch.equal(policy.eval_gates(lang), gates)
    finally:
        experiment.close()


def test_masks_path_reuses_a_saved_set_and_rejects_another_models(tmp_path, monkeypatch):
    run(tiny_config(*KEEP_HALF), tmp_path / "first")
    saved = tmp_path / "first" / "masks" / "masks.safetensors"
    monkeypatch.setattr(static, "search_masks", lambda *a: pytest.fail("masks were recomputed"))
    run(tiny_config(*KEEP_HALF, f"masks.path={saved}"), tmp_path / "second")
    first = SubnetworkSet.load(saved)
    second = SubnetworkSet.load(tmp_path / "second" / "masks" / "masks.safetensors")
    assert all(torch.equal(first[k].unit_mask, second[k].unit_mask) for k in first)
    with pytest.raises(MaskMismatchError, match=r"\(layers, heads\) = \(2, 4\).*\(3, 4\)"):
        run(tiny_config(*KEEP_HALF, f"masks.path={saved}", "model.tiny.num_layers=3"), tmp_path / "third")


def test_resumed_static_run_restores_masks_without_recomputing(tmp_path, monkeypatch):
    reference = run(tiny_config(*KEEP_HALF), tmp_path / "reference")
    crash_after_checkpoint(monkeypatch, tiny_config(*KEEP_HALF), tmp_path / "resumed")
    (tmp_path / "resumed" / "masks" / "masks.safetensors").unlink()  # must come from the checkpoint
    monkeypatch.setattr(static, "search_masks", lambda *a: pytest.fail("masks were recomputed"))
    assert scores(run(tiny_config(*KEEP_HALF), tmp_path / "resumed")) == scores(reference)


@pytest.mark.parametrize("policy", ["support", "nearest"])
def test_target_policies_estimate_masks_from_support_sentences(tmp_path, policy):
    results = run(
        tiny_config(*KEEP_HALF, "method.apply=both", f"masks.target_policy={policy}", "fewshot.k=5"), tmp_path
    )
    assert set(results["support"]) == {"syn_svo_na", "syn_vos", "syn_sov_an"}
    assert all(s == {"split": "train", "sentences": 5} for s in results["support"].values())
    assert set(results["target_sparsity"]) == {"syn_svo_na", "syn_vos", "syn_sov_an"}
    if policy == "nearest":
        assert set(results["nearest"].values()) <= {"syn_svo", "syn_sov", "syn_vso", "syn_osv"}
        masks = SubnetworkSet.load(tmp_path / "masks" / "masks.safetensors")
        for target, source in results["nearest"].items():
            assert results["target_sparsity"][target] == pytest.approx(masks[source].sparsity())
    else:
        mean_source = sum(results["sparsity"].values()) / len(results["sparsity"])
        assert all(abs(s - mean_source) < 0.2 for s in results["target_sparsity"].values())


def test_support_drawn_from_the_test_file_is_excluded_from_scoring(tmp_path):
    # targets whose only split is test: support comes from it and leaves the scored set
    overrides = [*KEEP_HALF, "masks.target_policy=support", "fewshot.k=5", "languages.synthetic.train=80"]
    experiment = Run(tiny_config(*overrides), tmp_path)
    experiment.setup()
    experiment.close()
    from subnets.data.dataset import LanguageData
    from subnets.data.support import draw_support, support_pool

    treebank = experiment.data.treebanks["syn_vos"]
    del treebank.files["train"], treebank.files["dev"]
    test = experiment.data.evaluated[("target", "syn_vos")]
    full = LanguageData("syn_vos", "test", list(test.examples), list(test.pieces))
    pool = support_pool(treebank, full, 5, experiment.task)
    assert pool is full
    support, rest = draw_support(pool, full, 5, seed=1)
    assert support.split == "test" and len(rest) == len(full) - 5
    ids = {s.sent_id for s in support.examples}
    assert ids.isdisjoint(s.sent_id for s in rest.examples)
    assert draw_support(pool, full, 5, seed=1)[0].examples == support.examples  # seeded
    assert draw_support(pool, full, 5, seed=2)[0].examples != support.examples


AFTER = [*KEEP_HALF[1:], "masks.after_steps=6"]  # debug=tiny: 12 steps, checkpoints every 4


@pytest.mark.parametrize("method", ["static", "random"])
def test_masks_after_steps_are_searched_on_the_shared_model_at_that_step(tmp_path, method):
    experiment = Run(tiny_config(*AFTER, f"+method={method}"), tmp_path / "run")
    experiment.setup()
    policy, model = experiment.method.policy, experiment.model
    try:
        heads = set(unit_parameter_masks(model, torch.ones(model.gates.shape, dtype=torch.bool)))
        for step in range(1, 7):
            assert policy.masks is None and policy.update_mask("syn_svo") is None
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            step_on(experiment, experiment.sampler.next_language())
            if step < 6:  # every head is updated until the search
                assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in heads)
        assert policy.masks is not None  # searched at step 6, after its update
        if method == "static":
            again = search_masks(model, policy.search, experiment.source_languages(), experiment.batcher,
                                          experiment.outputs)  # fmt: skip
            assert all(torch.equal(again[lang].unit_mask, policy.masks[lang].unit_mask) for lang in again)
        assert not changed_outside(*masked_step(experiment)[1:])  # masked from then on
    finally:
        experiment.close()
    from_start = run(tiny_config(*KEEP_HALF), tmp_path / "from_start")
    later = SubnetworkSet.load(tmp_path / "run" / "masks" / "masks.safetensors")
    first = SubnetworkSet.load(tmp_path / "from_start" / "masks" / "masks.safetensors")
    if method == "static":  # importance on the trained model is not the pretrained model's
        assert any(not torch.equal(later[lang].unit_mask, first[lang].unit_mask) for lang in first)
    assert from_start["source"]


@pytest.mark.parametrize("crash_at", [4, 8])  # before and after the search at step 6
def test_a_run_with_masks_after_steps_resumes_to_the_same_result(tmp_path, monkeypatch, crash_at):
    settings = ["+method=static", *AFTER]
    reference = run(tiny_config(*settings), tmp_path / "reference")
    crash_after_checkpoint(monkeypatch, tiny_config(*settings), tmp_path / "resumed", step=crash_at)
    assert scores(run(tiny_config(*settings), tmp_path / "resumed")) == scores(reference)
    assert json.loads((tmp_path / "resumed/masks/summary.json").read_text()) == json.loads(
        (tmp_path / "reference/masks/summary.json").read_text()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+method=dynamic", "dynamic.init=static", "masks.after_steps=4"],
            "is not supported by method dynamic",
        ),
        ([*KEEP_HALF, "masks.after_steps=12"], "expected fewer than train.steps=12"),
        ([*KEEP_HALF, "masks.after_steps=4", "masks.path=masks.safetensors"], "a loaded mask set"),
        (["+method=baseline", "masks.after_steps=-1"], r"masks.after_steps=-1: expected >= 0"),
    ],
)
def test_masks_after_steps_is_refused_where_it_cannot_apply(tmp_path, overrides, message):
    """(Where no mask is searched, as for the baseline, it is unused like the other search settings.)"""
    from subnets.config import SettingError
    from subnets.training.assemble import build_method, check_method_settings

    unused = tiny_config("+method=dynamic", "masks.after_steps=4")  # no search: unused, as at budget=cpu
    check_method_settings(unused, build_method(unused))
    with pytest.raises(SettingError, match=message):
        run(tiny_config(*overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
