"""Controls for masks: random masks with the static counts, their chance level, split-half
reliability, and the methods built on them (random, maml_random, dynamic.rule=random)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import crash_after_checkpoint, scores, tiny_config

from subnets.masks.controls import (
    expected_random_jaccard,
    generator,
    jaccard,
    random_like,
    random_unit_mask,
    split_half_agreement,
)
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet
from subnets.training.runner import run


def mask_set() -> SubnetworkSet:
    masks = SubnetworkSet(4, 6, {"w": (5, 7)})
    rng = np.random.default_rng(0)
    for lang in ("aa", "bb", "cc"):
        unit_mask = torch.from_numpy(rng.random((4, 6)) < 0.5)
        unit_mask[:, 0] = True
        masks[lang] = Subnetwork(unit_mask, {"w": torch.from_numpy(rng.random((5, 7)) < 0.3)})
    return masks


def test_random_masks_keep_every_layers_and_tensors_count_and_are_seeded():
    masks = mask_set()
    drawn = random_like(masks, seed=1)
    for lang, subnetwork in masks.items():
        assert torch.equal(drawn[lang].unit_mask.sum(1), subnetwork.unit_mask.sum(1))
        assert int(drawn[lang].param_masks["w"].sum()) == int(subnetwork.param_masks["w"].sum())
    assert all(torch.equal(random_like(masks, 1)[lang].unit_mask, drawn[lang].unit_mask) for lang in masks)
    assert any(
        not torch.equal(random_like(masks, 2)[lang].unit_mask, drawn[lang].unit_mask) for lang in masks
    )
    assert not torch.equal(drawn["aa"].unit_mask, masks["aa"].unit_mask)


def test_the_chance_level_is_the_closed_form_and_what_random_masks_give():
    # 1 of 4 heads in each of 2 layers: I ~ Bin(2, 1/4); J = I / (4 - I): (6/16) / 3 + 1/16
    assert expected_random_jaccard([1, 1], [1, 1], 4) == pytest.approx(3 / 16, abs=1e-12)
    assert expected_random_jaccard([4, 4], [4, 4], 4) == pytest.approx(1.0)
    counts_a, counts_b = [2, 3, 1], [3, 3, 2]
    rng = generator(0, "test")
    sampled = [
        jaccard(random_unit_mask(counts_a, 6, rng), random_unit_mask(counts_b, 6, rng)) for _ in range(20000)
    ]
    assert np.mean(sampled) == pytest.approx(expected_random_jaccard(counts_a, counts_b, 6), abs=0.005)


def test_split_half_agreement_is_one_for_identical_halves_and_falls_with_them():
    scores_ = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :3] = True
    same = split_half_agreement((scores_, scores_.clone()), mask)
    assert same["jaccard"] == 1.0 and same["spearman"] == 1.0
    assert same["random_jaccard"] == pytest.approx(expected_random_jaccard([3, 3, 3], [3, 3, 3], 8))
    opposite = split_half_agreement((scores_, -scores_), mask)
    assert opposite["spearman"] == pytest.approx(-1.0) and opposite["jaccard"] == 0.0


SEARCH = ["masks.finetune_steps=2", "masks.selection=top_k", "masks.top_k=4"]


def test_a_random_run_has_the_static_counts_other_heads_and_no_reliability_of_its_own(tmp_path):
    static = run(tiny_config("+method=static", *SEARCH), tmp_path / "static")
    random = run(tiny_config("+method=random", *SEARCH), tmp_path / "random")
    assert random["method"] == "random" and static["sparsity"] == random["sparsity"]
    static_masks = SubnetworkSet.load(tmp_path / "static" / "masks" / "masks.safetensors")
    random_masks = SubnetworkSet.load(tmp_path / "random" / "masks" / "masks.safetensors")
    for lang in static_masks:
        assert torch.equal(static_masks[lang].unit_mask.sum(1), random_masks[lang].unit_mask.sum(1))
    assert any(
        not torch.equal(static_masks[lang].unit_mask, random_masks[lang].unit_mask) for lang in static_masks
    )
    static_summary = json.loads((tmp_path / "static" / "masks" / "summary.json").read_text())
    random_summary = json.loads((tmp_path / "random" / "masks" / "summary.json").read_text())
    assert set(static_summary["reliability"]) == set(static_masks)
    assert {"jaccard", "random_jaccard", "spearman", "disjoint"} <= set(
        static_summary["reliability"]["syn_svo"]
    )
    assert "reliability" not in random_summary and "random_jaccard" in random_summary
    again = run(tiny_config("+method=random", *SEARCH, f"masks.path={tmp_path / 'static/masks/masks.safetensors'}"),
                tmp_path / "from_path")  # fmt: skip
    assert scores(again)["source"] == scores(random)["source"]  # same counts, same seed: the same masks


def test_maml_random_runs_the_episode_with_random_masks(tmp_path):
    results = run(tiny_config("+method=maml_random", *SEARCH), tmp_path)
    assert results["method"] == "maml_random" and results["sparsity"]


def test_the_random_rule_redraws_at_every_update_and_resumes_exactly(tmp_path, monkeypatch):
    settings = ["+method=dynamic", "dynamic.rule=random", "dynamic.update_every=3"]
    reference = run(tiny_config(*settings), tmp_path / "reference")
    history = json.loads((tmp_path / "reference" / "masks" / "history.json").read_text())
    kept = {lang: [int(np.sum(entry["mask"])) for entry in entries] for lang, entries in history.items()}
    assert all(counts[1:] == [4] * (len(counts) - 1) for counts in kept.values())  # keep_ratio 0.5 of 8 heads
    masks = {
        lang: [tuple(map(tuple, entry["mask"])) for entry in entries[1:]] for lang, entries in history.items()
    }
    assert any(len(set(drawn)) > 1 for drawn in masks.values())  # redrawn, not fixed
    crash_after_checkpoint(monkeypatch, tiny_config(*settings), tmp_path / "resumed")
    assert scores(run(tiny_config(*settings), tmp_path / "resumed")) == scores(reference)
