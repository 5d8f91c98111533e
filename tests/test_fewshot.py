"""The few-shot protocol: support sampling, exclusion from the scored set, repetitions, masks."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from subnets.config import compose_config
from subnets.data.support import draw_support, support_pool, support_split
from subnets.data.treebank import read_conllu
from subnets.evaluate.fewshot import fine_tune
from subnets.evaluate.results import few_shot_results
from subnets.training.runner import Run, run


@pytest.fixture
def trained(tmp_path):
    experiment = Run(tiny_config("fewshot.k=6", "fewshot.repetitions=3", "fewshot.steps=3"), tmp_path)
    experiment.setup()
    experiment.train()
    yield experiment
    experiment.close()


def test_support_from_the_test_file_never_reaches_the_scored_set(trained):
    code = "syn_vos"
    treebank = trained.data.treebanks[code]
    del treebank.files["train"], treebank.files["dev"]  # only a test file: support comes from it
    trained.data.target_test = {code: trained.data.target_test[code]}
    test = trained.data.target_test[code]
    pool = support_pool(treebank, test, 6, trained.task)  # where support comes from now: the test file
    assert pool is test
    trained.data.support_pools[code] = pool
    result = few_shot_results(trained.evaluation())["languages"][code]
    predicted = read_conllu(trained.folder / "predictions" / "fewshot" / f"{code}-test.conllu").examples
    for repetition, run_ in enumerate(result["runs"]):
        support, _ = draw_support(pool, test, 6, run_["seed"])
        assert run_["support_split"] == "test"
        assert run_["words"] == test.num_words - support.num_words  # the denominator excludes them
        if repetition == 0:
            support_ids = {s.sent_id for s in support.examples}
            assert support_ids.isdisjoint(s.sent_id for s in predicted)
            assert len(predicted) == len(test) - 6
    seeds = [r["seed"] for r in result["runs"]]
    assert len(set(seeds)) == 3
    supports = [tuple(s.sent_id for s in draw_support(pool, test, 6, seed)[0].examples) for seed in seeds]
    assert len(set(supports)) == 3  # each repetition draws its own support set


def test_repetitions_are_summarised_by_mean_and_sample_sd(trained):
    result = few_shot_results(trained.evaluation())
    for summary in result["languages"].values():
        las = np.array([r["las"] for r in summary["runs"]])
        assert summary["las_mean"] == pytest.approx(las.mean())
        assert summary["las_sd"] == pytest.approx(las.std(ddof=1))
        assert summary["support_split"] == "train"
    assert result["mean"]["las"] == pytest.approx(
        np.mean([s["las_mean"] for s in result["languages"].values()])
    )
    again = few_shot_results(trained.evaluation())
    assert again == result  # seeded: the same draws and the same fine-tuning


def test_support_split_rule():
    from subnets.data.discovery import LanguageFiles

    treebank = LanguageFiles("xx_yy", None, {"train": "t", "dev": "d", "test": "e"})
    assert support_split(treebank, 20, {"train": 31, "dev": 5, "test": 900}) == "train"
    assert support_split(treebank, 20, {"train": 19, "dev": 100, "test": 900}) == "dev"  # train too small
    assert support_split(treebank, 20, {"train": 19, "dev": 5, "test": 900}) == "test"
    with pytest.raises(ValueError, match="no split holds k=20"):
        support_split(treebank, 20, {"train": 19, "dev": 5, "test": 10})


def test_support_that_would_empty_the_scored_split_fails_at_start(tmp_path):
    # train (80) and dev (20) are smaller than k, so the support comes from the 90 test sentences
    with pytest.raises(ValueError, match=r"syn_vos: the k=90 .* test split.* none\s+would be left to score"):
        run(tiny_config("fewshot.k=90", "languages.synthetic.test=90"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # before any training


def test_fine_tuning_with_an_update_mask_leaves_other_coordinates_alone(trained):
    import copy

    from subnets.masks.subnetwork import unit_parameter_masks

    model = copy.deepcopy(trained.model)
    batch = trained.batcher.of(trained.data.target_test["syn_vos"], range(6))
    unit_mask = torch.ones(model.gates.shape, dtype=torch.bool)
    unit_mask[:, :2] = False
    mask = unit_parameter_masks(model, unit_mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune(model, batch, 3, 1e-3, 1e-3, 0.01, 5.0, update_mask=mask)
    after = dict(model.named_parameters())
    for name, owned in mask.items():
        assert torch.equal(after[name][~owned], before[name][~owned])
        assert not torch.equal(after[name][owned], before[name][owned])


def test_sgd_fine_tuning_is_plain_sgd_and_masked_updates_stay_exact(trained):
    import copy

    from subnets.masks.subnetwork import unit_parameter_masks

    model = copy.deepcopy(trained.model).train()
    batch = trained.batcher.of(trained.data.target_test["syn_vos"], range(6))
    model.zero_grad()
    torch.manual_seed(3)  # the same dropout as fine_tune's step below
    model(batch).loss.backward()
    encoder = {id(p) for _, p in model.encoder_parameters()}
    expected = {n: (p - (1e-5 if id(p) in encoder else 1e-4) * p.grad).detach() for n, p in model.named_parameters()
                if p.grad is not None}  # fmt: skip
    model.zero_grad()
    torch.manual_seed(3)
    fine_tune(model, batch, 1, 1e-5, 1e-4, optimizer="sgd")
    for name, parameter in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(parameter.detach(), expected[name], rtol=0, atol=1e-7)
    unit_mask = torch.ones(model.gates.shape, dtype=torch.bool)
    unit_mask[:, :2] = False
    mask = unit_parameter_masks(model, unit_mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune(model, batch, 2, 1e-3, 1e-3, 0.01, 5.0, update_mask=mask, optimizer="sgd")
    after = dict(model.named_parameters())
    for name, owned in mask.items():
        assert torch.equal(after[name][~owned], before[name][~owned])
        assert not torch.equal(after[name][owned], before[name][owned])
    with pytest.raises(ValueError, match="fewshot.optimizer='adam': expected one of adamw, sgd"):
        fine_tune(model, batch, 1, 1e-5, 1e-4, optimizer="adam")


def test_the_langedijk_protocol_config_holds_under_a_budget(tmp_path):
    for cfg in (compose_config(["+fewshot=langedijk"]),
                compose_config(["+experiment=ud_fewshot", "+fewshot=langedijk"])):  # fmt: skip
        fewshot = cfg.fewshot
        assert (fewshot.optimizer.value, fewshot.lr_encoder, fewshot.lr_head, fewshot.steps, fewshot.repetitions,
                fewshot.k, fewshot.weight_decay) == ("sgd", 1e-5, 1e-4, 20, 20, 20, 0.0)  # fmt: skip
    fewshot = run(tiny_config("+fewshot=langedijk", "fewshot.repetitions=2", "fewshot.k=5", "fewshot.steps=2"),
                  tmp_path)["fewshot"]  # fmt: skip
    assert (fewshot["optimizer"], fewshot["lr_head"], len(fewshot["languages"]["syn_vos"]["runs"])) == (
        "sgd",
        1e-4,
        2,
    )


def test_few_shot_results_and_table_in_a_run(tmp_path, capsys):
    results = run(tiny_config("+method=static", "masks.finetune_steps=2", "masks.selection=keep_ratio",
                              "masks.importance_batches=1", "masks.batch_size=4", "masks.target_policy=nearest",
                              "method.apply=both"), tmp_path)  # fmt: skip
    fewshot = results["fewshot"]
    assert set(fewshot["languages"]) == {"syn_vos", "syn_sov_an"}
    assert fewshot["k"] == 5 and fewshot["repetitions"] == 2 and fewshot["steps"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["fewshot"] == fewshot
    out = capsys.readouterr().out
    assert "few-shot: k=5 support examples, 2 steps, 2 repetitions" in out
    assert f"{fewshot['languages']['syn_vos']['las_mean']:.2f} +- " in out
    assert (tmp_path / "predictions" / "fewshot" / "syn_vos-test.conllu").exists()


def test_few_shot_adaptation_improves_on_zero_shot(tmp_path):
    settings = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "task.arc_dim=64", "task.label_dim=32",
                "languages.synthetic.train=300", "train.steps=200", "train.batch_size=32", "train.eval_every=100",
                "train.warmup_steps=20", "fewshot.k=20", "fewshot.steps=20", "fewshot.repetitions=3"]  # fmt: skip
    results = run(tiny_config(*settings), tmp_path)
    # syn_vos: a verb-initial order no source language has; 20 sentences teach it
    zero, few = results["target"]["syn_vos"]["las"], results["fewshot"]["languages"]["syn_vos"]["las_mean"]
    assert few > zero + 10, (zero, few)


def test_each_repetition_starts_from_the_trained_model_which_is_left_unchanged(trained):
    import copy

    from subnets.data.support import draw_support
    from subnets.evaluate import evaluate

    model = trained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = few_shot_results(trained.evaluation())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit
    assert model.training  # its mode too
    # the last repetition of the last language, by hand on a copy of the trained model
    code, settings = "syn_sov_an", trained.cfg.fewshot
    last = result["languages"][code]["runs"][-1]
    test = trained.data.target_test[code]
    support, rest = draw_support(trained.data.support_pools[code], test, settings.k, last["seed"])
    support.tokenize(trained.tokenizer)
    adapted = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(last["seed"])
        fine_tune(adapted, trained.batcher.of(support), settings.steps, settings.lr_encoder, settings.lr_head,
                  settings.weight_decay, trained.cfg.train.clip_norm)  # fmt: skip
    by_hand = evaluate(
        adapted, rest, trained.batcher.collator, trained.task, trained.cfg.train.eval_batch_size
    )
    assert {k: last[k] for k in by_hand} == by_hand


def test_a_long_support_set_is_cut_into_length_sorted_micro_batches_that_give_the_same_step(trained):
    import copy
    import dataclasses

    data = trained.data.target_test["syn_vos"]
    data = dataclasses.replace(data, examples=data.examples[:12], pieces=data.pieces[:12])
    lengths = [sum(len(w) for w in pieces) + 2 for pieces in data.pieces]
    assert len(trained.batcher.micro_batches(data, 12 * max(lengths))) == 1  # fits: one batch
    budget = 3 * max(lengths)
    parts = trained.batcher.micro_batches(data, budget)
    sizes = [len(p.examples) for p in parts]
    assert len(parts) > 1 and sum(sizes) == 12
    assert sum(p.num_words for p in parts) == data.num_words
    assert all(p.input_ids.shape[0] * p.input_ids.shape[1] <= budget for p in parts)
    widths = [p.input_ids.shape[1] for p in parts]
    assert widths == sorted(widths)  # length-sorted

    steps = {}
    for name, batches in (("whole", trained.batcher.of(data)), ("micro", parts)):
        model = copy.deepcopy(trained.model)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the same forward for both: no dropout
        fine_tune(model, batches, 1, 1e-2, 1e-2, optimizer="sgd")
        steps[name] = {n: p.detach() for n, p in model.named_parameters()}
    before = dict(trained.model.named_parameters())
    moved = 0
    for name, whole in steps["whole"].items():
        torch.testing.assert_close(steps["micro"][name], whole, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(whole, before[name].detach())
    assert moved > 10  # the step did update the model
