"""subnets.masks.core: the runner's subnetwork policies and the Hugging Face wrapper reach the same
masks, unions, gradient restriction and dynamic re-selection, and each loads the other's sets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from subnets.hf import SubnetworkConfig, SubnetworkModel, find_subnetworks, with_subnetworks
from subnets.masks import Subnetwork, SubnetworkSet, find_subnetwork
from subnets.methods.dynamic import DynamicMasks, EMARule
from subnets.methods.subnetworks import RandomControl, SubnetworkPolicy
from subnets.optim.masked import MaskedOptimizer
from subnets.training.update import StepResult, apply_update

VOCAB, LENGTH = 40, 8


def tiny_tagger(seed: int = 0) -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForTokenClassification(config)


def batches(shift: int, n: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(shift + 7)
    ids = torch.randint(5, VOCAB, (n, 8, LENGTH), generator=generator)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": (b + shift) % 3} for b in ids]


def search(**overrides) -> SimpleNamespace:
    """The runner's ``masks.*`` settings that the policies read."""
    values = dict(units="both", keep_ratio=0.5, top_k=None, min_heads_per_layer=1, importance="head",
                  target_policy="full", selection="keep_ratio", activation_quantile=0.95)  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


class Scorer(nn.Module):
    """The wrapped model as the runner's search sees a model: ``.gates`` and ``model(batch).loss``."""

    def __init__(self, wrapped: SubnetworkModel):
        super().__init__()
        self.inner, self.gates = wrapped.model, wrapped.gates

    def forward(self, batch):
        return self.inner(**batch)


@pytest.fixture
def wrapped() -> SubnetworkModel:
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="both", keep_ratio=0.5, apply="both"))
    find_subnetworks(model, {"de": tuple(batches(0)), "fr": tuple(batches(1))})  # ready batches
    return model


def runner_policy(model: nn.Module, masks: SubnetworkSet, apply: str) -> SubnetworkPolicy:
    policy = SubnetworkPolicy(search(), apply=apply)
    policy.model = model
    policy.set_masks(masks)
    return policy


def test_find_subnetworks_and_the_runners_search_give_the_same_set_and_each_loads_the_others(
    wrapped, tmp_path
):
    for code, shift in (("de", 0), ("fr", 1)):
        found = find_subnetwork(Scorer(wrapped), batches(shift), importance="head", selection="keep_ratio",
                                keep_ratio=0.5, min_heads_per_layer=1)  # fmt: skip
        assert torch.equal(found.subnetwork.unit_mask, wrapped.masks[code].unit_mask)
        torch.testing.assert_close(found.importance.float(), wrapped.masks[code].scores, rtol=0, atol=0)
    # a set the wrapper saved, read as the runner reads masks.path, and a set the runner saved, in the wrapper
    wrapped.save_pretrained(tmp_path / "hf")
    loaded = SubnetworkSet.load(tmp_path / "hf" / "subnetworks.safetensors", expect=wrapped.masks)
    assert all(torch.equal(loaded[c].unit_mask, wrapped.masks[c].unit_mask) for c in ("de", "fr"))
    policy = runner_policy(wrapped, loaded, "both")
    policy.masks.save(tmp_path / "masks.safetensors")  # what write_summary writes
    again = SubnetworkModel(tiny_tagger(), SubnetworkConfig(**policy.settings()),
                            masks=SubnetworkSet.load(tmp_path / "masks.safetensors", expect=wrapped.masks))  # fmt: skip
    assert set(again.masks) == {"de", "fr"} and again.subnetwork_config.apply == "both"
    assert torch.equal(again.gate_values(["fr"]), policy.gates("fr"))
    # a set saved with the wrapper's former names (min_per_layer, importance='gradient') still loads
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["config"] = {**{k: v for k, v in config["config"].items() if k != "min_heads_per_layer"},
                        "min_per_layer": 2, "importance": "gradient"}  # fmt: skip
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    old = SubnetworkModel.from_pretrained(tiny_tagger(), str(tmp_path / "hf"))
    assert old.subnetwork_config.min_heads_per_layer == 2 and old.subnetwork_config.importance == "head"


def test_the_random_control_is_the_same_transform_in_both_paths(wrapped):
    drawn = RandomControl(seed=3)(wrapped.masks)
    assert all(
        torch.equal(drawn[c].unit_mask.sum(dim=1), wrapped.masks[c].unit_mask.sum(dim=1)) for c in drawn
    )
    assert not torch.equal(drawn["de"].unit_mask, wrapped.masks["de"].unit_mask)
    # the wrapper's random rule: the runner's control drawn with the counts of its keep_ratio in every layer
    control = with_subnetworks(
        tiny_tagger(), SubnetworkConfig(units="both", rule="random", keep_ratio=0.5, seed=3)
    )
    random = find_subnetworks(control, {"de": tuple(batches(0))})
    half = SubnetworkSet(control.gates.num_layers, control.gates.units)
    half["xx"] = Subnetwork(torch.arange(control.gates.shape[1]).repeat(2, 1) % 2 == 0)
    assert torch.equal(random["de"].unit_mask, RandomControl(seed=3).unseen(half, "de").unit_mask)


@pytest.mark.parametrize("apply", ["gradient", "both", "forward"])
def test_union_and_gradient_restriction_are_the_same_in_both_paths(wrapped, apply):
    wrapped.subnetwork_config.apply = apply
    wrapped.set_masks(wrapped.masks)  # forget cached update masks
    policy = runner_policy(wrapped, wrapped.masks, apply)
    named = dict(wrapped.named_parameters())
    for languages in (["de"], ["de", "fr"]):
        ours, theirs = policy.union_update_mask(languages), wrapped.update_mask(languages)
        assert (ours is None) == (theirs is None) == (apply == "forward")
        if ours is not None:
            assert {id(named[n]) for n in ours} == {id(p) for p in theirs}
            assert all(torch.equal(ours[n], theirs[named[n]]) for n in ours)
    expected = None if apply == "gradient" else wrapped.masks["de"].unit_mask.float()
    assert (policy.gates("de") is None and expected is None) or torch.equal(policy.gates("de"), expected)
    assert (wrapped.gate_values(["de"]) is None) == (expected is None)
    # the gradients a step of de and fr zeroes before clipping: the runner's apply_update, the wrapper's step
    grads = {n: torch.randn_like(p) for n, p in named.items()}
    results = []
    for runner in (True, False):
        optimizer = MaskedOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.0), wrapped.named_parameters())
        for n, p in named.items():
            p.grad = grads[n].clone()
        if runner:
            apply_update(wrapped, optimizer, 1.0, update_mask=policy.union_update_mask(["de", "fr"]))
        else:
            wrapped._seen = {"de", "fr"}
            wrapped.before_optimizer_step(optimizer)
        results.append({n: p.grad.clone() for n, p in named.items()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in named)
    zeroed = sum(int((results[0][n] == 0).sum()) for n in named)
    assert (zeroed > 0) == (apply != "forward")


def test_the_dynamic_rule_gives_the_same_masks_in_both_paths(wrapped):
    config = SubnetworkConfig(units="both", rule="dynamic", keep_ratio=0.4, ema_decay=0.7, update_every=1)
    model = with_subnetworks(tiny_tagger(), config)
    dynamic = SimpleNamespace(rule="ema", decay=0.7, selection="keep_ratio", score_threshold=0.3, init="full",
                              update_every=1)  # fmt: skip
    policy = DynamicMasks(search(keep_ratio=0.4), dynamic)
    rule = policy.rule
    assert isinstance(rule, EMARule)
    rule.bind(["de", "fr"], model.gates.shape, torch.device("cpu"), units=model.gates.units)
    policy.model = model
    start = SubnetworkSet(model.gates.num_layers, model.gates.units)
    for code in ("de", "fr"):
        start[code] = wrapped.masks[code]
    policy.set_masks(start)
    model.set_masks(start)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        grads = {
            code: torch.randn(model.gates.shape, generator=generator, dtype=torch.float64)
            for code in ("de", "fr")
        }
        probes = []
        for code, grad in grads.items():
            probe = torch.zeros(model.gates.shape, dtype=torch.float64, requires_grad=True)
            probe.grad = grad.clone()
            probes.append((probe, [code]))
        model._probes, model._seen = probes, {"de", "fr"}
        model.before_optimizer_step()
        assert model.after_optimizer_step()
        rule.observe(StepResult(loss=0.0, losses={}, grad_norm=0.0, words=1, gate_grads=grads))
        policy.update_masks(step)
        for code in ("de", "fr"):
            assert torch.equal(policy.masks[code].unit_mask, model.masks[code].unit_mask), (step, code)
            torch.testing.assert_close(policy.masks[code].scores, model.masks[code].scores, rtol=0, atol=0)
    assert policy.settings()["rule"] == "dynamic"
    assert SubnetworkConfig(**policy.settings()).min_heads_per_layer == 1


def test_the_runners_test_time_policies_are_refused_with_their_reason_in_the_wrapper(wrapped):
    model = with_subnetworks(
        tiny_tagger(), SubnetworkConfig(units="both", target_policy="support"), masks=wrapped.masks
    )
    assert model.subnetwork("de") is wrapped.masks["de"]
    with pytest.raises(
        KeyError, match="target_policy='support' estimates it from support sentences.*find_subnetworks"
    ):
        model.set_language("it")
