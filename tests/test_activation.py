"""masks.importance=activation (subnets.masks.activation): LAPE's activation probabilities and
entropies against hand-computed numbers, the selection they make, the settings refused, the
split-half reliability of its masks, and a static run that learns with them."""

import contextlib
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, tiny_transformer
from torch import nn

from subnets.config import SettingError
from subnets.files import read_jsonl
from subnets.masks.activation import (
    activation_bar,
    activation_probabilities,
    activation_scores,
    language_entropy,
    language_neurons,
)
from subnets.masks.controls import split_half_agreement
from subnets.masks.search import find_subnetwork
from subnets.masks.selection import select_top_k
from subnets.models.gates import NeuronGates
from subnets.training.assemble import check_settings
from subnets.training.runner import run


# ---------------------------------------------------------------- a stub whose activations are given
class Stub(nn.Module):
    """Two layers whose feed-forward output projections (3 neurons each) receive the activations a
    batch carries: ``batch.activations[layer]``, ``[sentences, tokens, 3]``."""

    def __init__(self):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(3, 2) for _ in range(2))

    def forward(self, batch):
        return [down(batch.activations[layer]) for layer, down in enumerate(self.down)]


def stub_gates(model: Stub):
    return SimpleNamespace(units={"neurons": 3}, outputs={"neurons": list(model.down)},
                           applied=lambda values: contextlib.nullcontext())  # fmt: skip


def signs(*sentences: list[str]) -> torch.Tensor:
    """``[sentences, tokens, 3]`` of +1 / -1 from one string per token ('+-+': neurons 0 and 2 active)."""
    return torch.tensor([[[1.0 if c == "+" else -1.0 for c in token] for token in s] for s in sentences])


def batch(layer0, layer1, mask):
    return SimpleNamespace(activations=[layer0, layer1], attention_mask=torch.tensor(mask))


# Language a: two batches. The first has a sentence of 3 tokens and one of 1 token and 2 padding
# positions, where every neuron is positive (padding must not count).
A = [
    batch(signs(["++-", "+--", "+--"], ["++-", "+++", "+++"]),
          signs(["+--", "+--", "+--"], ["+--", "+++", "+++"]), [[1, 1, 1], [1, 0, 0]]),
    batch(signs(["--+", "---"]), signs(["+--", "+--"]), [[1, 1]]),
]  # fmt: skip
# Language b: one sentence of 4 tokens.
B = [batch(signs(["+-+", "+-+", "+--", "+--"]), signs(["++-", "+--", "+--", "+--"]), [[1, 1, 1, 1]])]
# By hand: layer 0, language a, 6 tokens: neuron 0 active on 4, neuron 1 on 2, neuron 2 on 1; layer 1 neuron 0
# on all 6. Language b, 4 tokens: layer 0 neuron 0 on 4, neuron 2 on 2; layer 1 neuron 0 on 4, neuron 1 on 1.
P_A = [[4 / 6, 2 / 6, 1 / 6], [1.0, 0.0, 0.0]]
P_B = [[1.0, 0.0, 2 / 4], [1.0, 1 / 4, 0.0]]


def h(*shares):
    return -sum(q * math.log(q) for q in shares if q > 0)


# normalised over the two languages: (2/3, 1) -> (0.4, 0.6); (1/3, 0) -> (1, 0); (1/6, 1/2) -> (0.25, 0.75);
# (1, 1) -> (0.5, 0.5); (0, 1/4) -> (0, 1); (0, 0): no language activates it -> log 2
ENTROPY = [[h(0.4, 0.6), 0.0, h(0.25, 0.75)], [math.log(2), 0.0, math.log(2)]]


def stub_probabilities():
    model = Stub()
    gates = stub_gates(model)
    return {
        lang: activation_probabilities(model, batches, gates=gates) for lang, batches in (("a", A), ("b", B))
    }


def test_activation_probabilities_and_entropies_match_a_hand_computed_case():
    probabilities = stub_probabilities()
    torch.testing.assert_close(probabilities["a"], torch.tensor(P_A))
    torch.testing.assert_close(probabilities["b"], torch.tensor(P_B))
    torch.testing.assert_close(language_entropy(probabilities), torch.tensor(ENTROPY))
    # the 12 probabilities sorted: 0 0 0 0 1/6 1/4 1/3 1/2 2/3 1 1 1; LAPE's bar is the round(q * 12)-th
    assert activation_bar(probabilities, 0.5) == pytest.approx(1 / 4)
    assert activation_bar(probabilities, 0.95) == 1.0
    assert activation_bar(probabilities, 0.0) == 0.0
    # measuring both languages together gives the same (one pass per batch, halves from even and odd batches)
    model = Stub()
    neurons = language_neurons(model, {"a": A, "b": B}, 0.5, gates=stub_gates(model))
    torch.testing.assert_close(neurons.probabilities["a"], torch.tensor(P_A))
    assert neurons.bar == pytest.approx(1 / 4) and neurons.halves == {}  # b has one batch: no halves


def test_activation_is_read_at_the_input_of_a_real_models_feed_forward_output_projection():
    # a tiny BERT whose intermediate projection ignores its input: act(bias) is positive for the even
    # neurons of layer 0 and the first 16 of layer 1, whatever the tokens and however much padding
    model = tiny_transformer()
    gates = NeuronGates(model)
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layer):
            layer.intermediate.dense.weight.zero_()
            bias = torch.tensor([1.0 if (j % 2 == 0 if i == 0 else j < 16) else -1.0 for j in range(64)])
            layer.intermediate.dense.bias.copy_(bias)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    batches = [{"input_ids": ids, "attention_mask": (ids > 0).long()}]
    p = activation_probabilities(model, batches, gates=gates, run=lambda b: model(**b))
    expected = torch.tensor([[1.0 - j % 2 for j in range(64)], [float(j < 16) for j in range(64)]])
    torch.testing.assert_close(p, expected)
    assert gates.values is None and not model.training


def test_each_language_keeps_its_lowest_entropy_neurons_above_the_bar_then_its_most_active():
    probabilities = stub_probabilities()
    scores = activation_scores(probabilities, 0.5)  # bar 1/4
    # a: above the bar layer 0 neurons 0 (2/3) and 1 (1/3), layer 1 neuron 0 (1): entropies h(.4,.6), 0, log 2;
    # below it layer 0 neuron 2 (1/6) and layer 1 neurons 1, 2 (0) score 0.5 p
    specific = 1 - h(0.4, 0.6) / math.log(2)
    torch.testing.assert_close(
        scores["a"], torch.tensor([[0.5 + 0.5 * specific, 1.0, 1 / 12], [0.5, 0.0, 0.0]])
    )
    # b: above the bar layer 0 neurons 0 and 2, layer 1 neuron 0; layer 1 neuron 1 has entropy 0 (b alone
    # activates it) but 1/4 is not above the bar, so it comes after those
    torch.testing.assert_close(
        scores["b"], torch.tensor([[0.5 + 0.5 * specific, 0.0, 1 - 0.5 * h(0.25, 0.75) / math.log(2)],
                                   [0.5, 0.125, 0.0]]))  # fmt: skip

    def kept(lang, k, minimum):
        return sorted(map(tuple, select_top_k(scores[lang], k, minimum).nonzero().tolist()))

    assert kept("a", 1, 0) == [(0, 1)]  # entropy 0 among a's neurons above the bar
    assert kept("a", 2, 0) == [(0, 0), (0, 1)]
    assert kept("a", 4, 0) == [(0, 0), (0, 1), (0, 2), (1, 0)]  # a budget past the bar: then a's most active
    assert kept("b", 2, 0) == [(0, 0), (0, 2)]
    assert kept("b", 4, 0) == [(0, 0), (0, 2), (1, 0), (1, 1)]
    assert kept("a", 2, 1) == [(0, 1), (1, 0)]  # masks.min_heads_per_layer: the best of each layer first
    # a neuron another language activates alone (layer 1 neuron 1, entropy 0) is never a's before its own
    assert scores["a"][1, 1] < scores["a"][0, 2]
    # with LAPE's 95th percentile no probability here is above the bar (1): the order is a's activation
    torch.testing.assert_close(activation_scores(probabilities)["a"], 0.5 * probabilities["a"])


def test_activation_importance_is_refused_for_heads_and_for_the_nearest_policy_with_the_reason():
    for units in ("heads", "both"):
        with pytest.raises(SettingError) as refused:
            check_settings(
                tiny_config("+method=static", "masks.importance=activation", f"masks.units={units}")
            )
        message = str(refused.value)
        assert f"masks.importance=activation with masks.units={units}" in message
        assert "feed-forward neurons only" in message and "masks.units=neurons" in message
    nearest = ["masks.importance=activation", "masks.units=neurons", "masks.target_policy=nearest"]
    for method in ("static", "dynamic dynamic.init=static"):
        with pytest.raises(
            SettingError, match=re.escape("masks.target_policy=nearest with masks.importance=activation")
        ):
            check_settings(tiny_config(*f"+method={method}".split(), *nearest))
    check_settings(tiny_config("+method=random", *nearest))  # a control's unseen masks take no scores
    check_settings(tiny_config("+method=static", *nearest[:2]))
    with pytest.raises(ValueError, match="needs the language's scores"):
        find_subnetwork(Stub(), [], importance="activation", selection="keep_ratio")


def test_split_half_reliability_of_activation_masks_from_a_tiny_model():
    model = tiny_transformer()
    model.gates = NeuronGates(model)  # what find_subnetwork reads
    generator = torch.Generator().manual_seed(0)

    def batches(low, high):  # a "language": 6 batches of 4 sentences of 10 tokens from its own vocabulary
        out = []
        for _ in range(6):
            ids = torch.randint(low, high, (4, 10), generator=generator)
            ids[1:, 7:] = 0  # padding
            out.append({"input_ids": ids, "attention_mask": (ids > 0).long()})
        return out

    languages = {"a": batches(3, 40), "b": batches(40, 80), "c": batches(80, 120)}
    neurons = language_neurons(model, languages, 0.9, split_half=True, run=lambda b: model(**b))
    assert set(neurons.halves) == set(languages)
    for lang in languages:
        found = find_subnetwork(model, languages[lang], importance="activation", selection="keep_ratio",
                                keep_ratio=0.25, scores=neurons.scores[lang], score_halves=neurons.halves[lang],
                                split_half=True)  # fmt: skip
        mask = found.subnetwork.unit_mask
        assert int(mask.sum()) == 32 and found.halves is neurons.halves[lang]
        assert torch.equal(found.importance, neurons.scores[lang])
        agreement = split_half_agreement(found.halves, mask, model.gates.units)
        assert set(agreement) == {"jaccard", "random_jaccard", "spearman"}
        # the halves see the same language: their masks agree far above random masks of the same counts
        assert agreement["jaccard"] > agreement["random_jaccard"] + 0.2, agreement
        assert agreement["spearman"] > 0.5, agreement


def test_a_static_run_with_activation_neurons_learns(tmp_path):
    overrides = ["+method=static", "masks.importance=activation", "masks.units=neurons", "masks.selection=keep_ratio",
                 "masks.importance_batches=2", "masks.batch_size=4", "train.log_every=1", "train.eval_every=12",
                 "fewshot.repetitions=0"]  # fmt: skip
    results = run(tiny_config(*overrides), tmp_path)
    assert results["sparsity"] == {lang: pytest.approx(0.5) for lang in results["sparsity"]}
    reliability = json.loads((tmp_path / "masks" / "reliability.json").read_text())
    assert set(reliability) == set(results["sparsity"])
    assert all(r["jaccard"] > r["random_jaccard"] for r in reliability.values()), reliability
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 1.0, losses


def test_find_subnetworks_selects_activation_neurons_as_the_runner_does():
    import transformers

    from subnets.hf import SubnetworkConfig, find_subnetworks, with_subnetworks
    from subnets.masks.activation import language_neurons
    from subnets.masks.selection import select_keep_ratio

    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = with_subnetworks(transformers.BertForTokenClassification(config),
                             SubnetworkConfig(units="neurons", importance="activation", keep_ratio=0.25))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    data = {code: tuple({"input_ids": torch.randint(low, low + 12, (4, 8), generator=generator),  # ready batches
                         "attention_mask": torch.ones(4, 8, dtype=torch.long)} for _ in range(3))
            for code, low in (("de", 5), ("fr", 20))}  # fmt: skip
    found = find_subnetworks(model, data)
    measured = language_neurons(model.model, data, 0.95, gates=model.gates, run=lambda b: model.model(**b))
    for code in data:
        assert torch.equal(
            found[code].unit_mask, select_keep_ratio(measured.scores[code], 0.25, 1, model.gates.units)
        )
    assert not torch.equal(found["de"].unit_mask, found["fr"].unit_mask)  # each language its own neurons
    with pytest.raises(ValueError, match="activation probabilities score feed-forward neurons"):
        SubnetworkConfig(units="heads", importance="activation")
