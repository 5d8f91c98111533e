"""subnets.analysis.neurons: the overlap of two selections of neurons against a hand-computed
case, the deactivation table of a stub whose loss is known for every gate setting and of a
tiny masked LM built so that each language's text activates neurons of its own, and the
model's mode and gates left as they were."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_transformer
from torch import nn

from subnets.analysis.neurons import deactivation_table, perplexity, selection_overlap
from subnets.masks.activation import language_neurons
from subnets.masks.selection import select_keep_ratio
from subnets.masks.subnetwork import MaskMismatchError, Subnetwork, SubnetworkSet
from subnets.models.encoder import Encoder
from subnets.models.gates import UnitGates
from subnets.models.lm import LanguageModel
from subnets.tasks.lm import LanguageModelling, LMBatch, TextLine


def mask(*rows: str) -> torch.Tensor:
    """A boolean mask from one string per layer ('1001': units 0 and 3)."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


# ---------------------------------------------------------------- selection_overlap
def test_selection_overlap_matches_a_hand_computed_case():
    # first: gradient-selected, heads and neurons (2 layers, 2 heads + 4 neurons); second: activation-selected
    # neurons only. Compared on the neurons (the heads' columns are left out).
    first = SubnetworkSet(2, {"heads": 2, "neurons": 4})
    first["de"] = Subnetwork(mask("11" + "1100", "01" + "1000"))
    first["fi"] = Subnetwork(mask("10" + "0001", "00" + "0000"))
    first["xx"] = Subnetwork(mask("11" + "1111", "11" + "1111"))
    second = SubnetworkSet(2, {"neurons": 4})
    second["de"] = Subnetwork(mask("1010", "1000"))
    second["fi"] = Subnetwork(mask("0010", "0100"))
    second["yy"] = Subnetwork(mask("1111", "1111"))
    found = selection_overlap(first, second)
    assert found["units"] == "neurons" and found["languages"] == ["de", "fi"]
    assert found["only_first"] == ["xx"] and found["only_second"] == ["yy"]
    # de: shared (0, 0) and (1, 0) of 3 + 3 neurons: Jaccard 2 / 4. Chance, 4 neurons a layer: layer 0 draws 2
    # and 2, overlap 0, 1, 2 with probability 1/6, 4/6, 1/6; layer 1 draws 1 and 1, overlap 1 with probability
    # 1/4. The total overlap I is 0, 1, 2, 3 with probability 3/24, 13/24, 7/24, 1/24, and the union 6 - I:
    # E[J] = 13/24 * 1/5 + 7/24 * 2/4 + 1/24 * 3/3 = 71/240
    de = found["per_language"]["de"]
    assert de["jaccard"] == 0.5 and de["chance"] == pytest.approx(71 / 240)
    assert de["ratio"] == pytest.approx(0.5 / (71 / 240))  # 120/71 = 1.69: above chance
    assert (de["first"], de["second"], de["shared"]) == (3, 3, 2)
    # fi: nothing shared (Jaccard 0); chance: layer 0 draws 1 and 1 (overlap 1 with probability 1/4), layer 1
    # 0 and 1 (never), union 3 - I: E[J] = 1/4 * 1/2 = 1/8
    fi = found["per_language"]["fi"]
    assert fi["jaccard"] == 0.0 and fi["chance"] == pytest.approx(1 / 8) and fi["ratio"] == 0.0
    assert (fi["first"], fi["second"], fi["shared"]) == (1, 2, 0)
    assert found["mean"] == pytest.approx(
        {"jaccard": 0.25, "chance": (71 / 240 + 1 / 8) / 2, "ratio": 60 / 71}
    )
    # identical selections: Jaccard 1 against the same chance both ways
    same = selection_overlap(second, second)["per_language"]["de"]
    assert same["jaccard"] == 1.0 and same["ratio"] == pytest.approx(1 / same["chance"])
    # the heads are the first set's only: compared on all units, or on heads, the sets do not fit
    for units in (None, "heads"):
        with pytest.raises(MaskMismatchError):
            selection_overlap(first, second, units=units)
    with pytest.raises(ValueError, match="share no language"):
        selection_overlap(first.kind("neurons"), SubnetworkSet(2, {"neurons": 4}))


# ---------------------------------------------------------------- a stub whose loss is known
class StubGates(UnitGates):
    """Two layers of 1 head and 3 neurons (heads first, as UnitGates orders them), on no model."""

    def __init__(self):
        self.units, self.num_layers, self.values = {"heads": 1, "neurons": 3}, 2, None
        self.columns = {"heads": slice(0, 1), "neurons": slice(1, 4)}


class Stub(nn.Module):
    """``loss = batch.base + the sum of batch.cost over the gated-off units`` (``cost``: ``[layers, 4]``,
    the head's column first), recording its mode, gradient setting and gates at every call."""

    def __init__(self):
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(()))
        self.gates = StubGates()
        self.calls = []

    def forward(self, batch):
        values = self.gates.values
        self.calls.append(
            (self.training, torch.is_grad_enabled(), None if values is None else values.clone())
        )
        off = torch.zeros(2, 4) if values is None else (values == 0).float()
        return SimpleNamespace(loss=batch.base + (off * batch.cost).sum() + self.zero)


def cost(**units: float) -> torch.Tensor:
    """``[2, 4]`` from keywords h<layer> (the head) and n<layer><neuron>."""
    out = torch.zeros(2, 4)
    for name, value in units.items():
        out[int(name[1]), 0 if name[0] == "h" else 1 + int(name[2])] = value
    return out


# a's text needs neurons (0, 0) and (1, 2) and the head of layer 0; b's needs (0, 1), and (1, 2) a little.
# a's two batches: losses 0 on 1 word and 1 on 3 words (mean per word 0.75); b: one batch of loss 0.5.
COST_A, COST_B = cost(n00=1.0, n12=1.0, h0=100.0), cost(n01=2.0, n12=0.5)
A = [SimpleNamespace(base=0.0, num_words=1, cost=COST_A), SimpleNamespace(base=1.0, num_words=3, cost=COST_A)]
B = SimpleNamespace(base=0.5, num_words=2, cost=COST_B)


def test_deactivation_table_of_a_stub_whose_loss_is_known_for_every_gate_setting():
    model = Stub()
    # a's neurons as [layers, neurons]; b's (0, 1) as 0/1 in a mask of every unit, whose head column is no
    # neuron's and is left on
    neurons = {"a": mask("100", "001"), "b": torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]])}
    table = deactivation_table(
        model, {"a": iter(A), "b": B}, neurons
    )  # an iterator, one batch: read as lists
    e = math.exp
    assert table["deactivated"] == table["evaluated"] == ["a", "b"]
    assert table["baseline"] == pytest.approx({"a": e(0.75), "b": e(0.5)})
    # zeroing a's neurons costs a 1 + 1 and b 0.5; zeroing b's costs a nothing and b 2
    assert np.allclose(table["metric"], [[e(2.75), e(1.0)], [e(0.75), e(2.5)]])
    change = [[e(2.75) - e(0.75), e(1.0) - e(0.5)], [0.0, e(2.5) - e(0.5)]]
    assert np.allclose(table["change"], change)
    assert table["diagonal"] == pytest.approx((change[0][0] + change[1][1]) / 2)
    assert table["off_diagonal"] == pytest.approx(change[0][1] / 2)
    assert table["neurons"] == {"a": 2, "b": 1}
    # each language once ungated and once per row; eval mode, no gradient, the head never gated off
    assert len(model.calls) == 3 * (len(A) + 1)
    assert all(not training and not grad for training, grad, _ in model.calls)
    gated = [values for _, _, values in model.calls if values is not None]
    assert len(gated) == 2 * (len(A) + 1) and all(bool((v[:, 0] == 1).all()) for v in gated)
    # rows and columns need not be the same languages: no pair is on the diagonal
    other = deactivation_table(model, {"b": [B]}, {"a": neurons["a"]})
    assert np.allclose(other["change"], [[e(1.0) - e(0.5)]]) and math.isnan(other["diagonal"])


def test_deactivation_table_restores_the_models_mode_and_gates_also_when_the_metric_fails():
    model = Stub()
    model.train()
    previous = torch.ones(2, 4)
    model.gates.set(previous)
    neurons = SubnetworkSet(2, {"heads": 1, "neurons": 3})  # a set of both kinds: its neurons are zeroed
    neurons["a"] = Subnetwork(mask("1100", "0001"))
    deactivation_table(model, {"a": A}, neurons)
    assert model.training and model.gates.values is previous and torch.is_grad_enabled()
    assert all(not training for training, _, _ in model.calls)

    def failing(model, batches):
        if model.gates.values is not None:
            raise RuntimeError("the metric failed")
        return perplexity(model, batches)

    with pytest.raises(RuntimeError, match="the metric failed"):
        deactivation_table(model, {"a": A}, neurons, failing)
    assert model.training and model.gates.values is previous and torch.is_grad_enabled()
    # scores are no masks; a mask of another shape is refused
    with pytest.raises(ValueError, match="not scores"):
        deactivation_table(model, {"a": A}, {"a": torch.full((2, 3), 0.5)})
    with pytest.raises(MaskMismatchError, match=r"\(layers, neurons\) = \(2, 3\)"):
        deactivation_table(model, {"a": A}, {"a": torch.zeros(3, 3, dtype=torch.bool)})
    assert model.training and model.gates.values is previous


# ---------------------------------------------------------------- a tiny masked LM with language neurons
def language_lm() -> LanguageModel:
    """A tiny BERT masked LM (gates on heads and neurons, ReLU) in which the text of language a (tokens
    5-9) activates exactly neurons 0-31 of both layers and that of b (tokens 60-64) exactly 32-63: the
    embeddings mark a's tokens +1 and b's -1 on dimension 0, uniform attention carries the sentence's
    mean of dimension 0 to every position (framing, [MASK] and random tokens too), and neuron j
    reads +dimension 0 (j < 32) or -dimension 0."""
    transformer = tiny_transformer()
    encoder = Encoder(transformer, units="both")  # its layout check runs on the model as built
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        transformer.embeddings.word_embeddings.weight[5:10, 0] += 1.0
        transformer.embeddings.word_embeddings.weight[60:65, 0] -= 1.0
        for layer in transformer.encoder.layer:
            attention = layer.attention
            for linear in (
                attention.self.query,
                attention.self.key,
                attention.self.value,
                attention.output.dense,
            ):
                linear.weight.zero_()
                linear.bias.zero_()
            attention.self.value.weight[0, 0], attention.output.dense.weight[0, 0] = 1.0, 10.0
            intermediate = layer.intermediate.dense
            intermediate.weight.zero_()
            intermediate.bias.zero_()
            intermediate.weight[:32, 0], intermediate.weight[32:, 0] = 1.0, -1.0
            layer.intermediate.intermediate_act_fn = nn.ReLU()
            output = layer.output.dense
            output.weight.copy_(0.3 * torch.randn(output.weight.shape, generator=generator))
            output.weight[0, :32], output.weight[0, 32:] = 0.1, -0.1  # keeps dimension 0's sign
    torch.manual_seed(0)
    return LanguageModel(encoder, "masked", 120, mask_id=4, mlm_probability=0.3).eval()


def text(lang: str, low: int, high: int, generator: torch.Generator) -> list[LMBatch]:
    """3 batches of 4 lines of 10 tokens from ``low``-``high`` ([CLS] 2, [SEP] 3; the last line shorter)."""
    batches = []
    for b in range(3):
        ids = torch.randint(low, high, (4, 12), generator=generator)
        ids[:, 0], ids[:, -1] = 2, 3
        ids[3, 7], ids[3, 8:] = 3, 0
        lines = [TextLine(f"{lang}{b}-{i}", ["w"] * 10) for i in range(4)]
        batches.append(LMBatch(ids, (ids > 0).long(), ids <= 3, lines, lang))
    return batches


def test_deactivating_a_languages_activation_selected_neurons_changes_its_perplexity_alone():
    model = language_lm()
    generator = torch.Generator().manual_seed(0)
    data = {"a": text("a", 5, 10, generator), "b": text("b", 60, 65, generator)}
    found = language_neurons(model, data, 0.5, run=model)
    own = torch.arange(64) < 32
    assert torch.equal(found.probabilities["a"], own.float().expand(2, 64))
    assert torch.equal(found.probabilities["b"], (~own).float().expand(2, 64))
    masks = SubnetworkSet(2, {"neurons": 64})
    for lang in data:
        masks[lang] = Subnetwork(select_keep_ratio(found.scores[lang], 0.25, 1))
    assert bool((masks["a"].unit_mask <= own).all()) and bool((masks["b"].unit_mask <= ~own).all())

    table = deactivation_table(model, data, masks)
    # b never activates a's neurons (ReLU: exactly 0), so zeroing them leaves b's perplexity exactly as it
    # was, and the other way round; each language's own neurons change its own
    change = np.array(table["change"])
    assert change[0, 1] == 0.0 and change[1, 0] == 0.0 and table["off_diagonal"] == 0.0
    assert change[0, 0] != 0.0 and change[1, 1] != 0.0
    assert abs(table["diagonal"]) > abs(table["off_diagonal"])
    # the default metric is the task's perplexity; a row is the perplexity under gates zeroing those neurons
    task = LanguageModelling("masked", 0.3)
    for lang, batches in data.items():
        predictions = [p for batch in batches for p in model.predict(batch)]
        lines = [line for batch in batches for line in batch.examples]
        assert table["baseline"][lang] == pytest.approx(task.score(lines, predictions)["perplexity"])
    gates = torch.ones(model.gates.shape)
    gates[:, model.gates.columns["neurons"]] = (~masks["a"].unit_mask).float()
    with torch.no_grad(), model.gates.applied(gates):
        assert table["metric"][0][0] == pytest.approx(perplexity(model, data["a"]))
    assert model.gates.values is None and not model.training


# ---------------------------------------------------------------- the study's script
def test_the_studys_deactivation_script_zeroes_the_runs_and_lapes_neurons_of_a_masked_lm_run(tmp_path):
    """docs/study/efficient/deactivation.py on a tiny masked-LM run with activation-selected neurons:
    a table for the run's own masks and one for LAPE's share, each row zeroing as many neurons as
    its selection holds, every metric its language's baseline plus the change."""
    import json

    from conftest import REPO, tiny_config
    from helpers import python

    from subnets.training.runner import run

    settings = ["task=mlm", "+method=static", "masks.units=neurons", "masks.importance=activation",
                "masks.selection=keep_ratio", "masks.keep_ratio=0.25", "train.steps=4", "fewshot.repetitions=0"]  # fmt: skip
    results = run(tiny_config(*settings), tmp_path / "run")
    script = REPO / "docs" / "study" / "efficient" / "deactivation.py"
    done = python(script, str(tmp_path / "run"), "--share", "0.05", "--batches", "2", "--output", "table.json",
                  cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((tmp_path / "table.json").read_text())
    layers, neurons = 2, 64  # debug=tiny's model
    languages = list(results["sparsity"])
    for name, per_language in (
        ("masks", round(0.25 * layers * neurons)),
        ("lape", round(0.05 * layers * neurons)),
    ):
        table = found[name]
        assert table["deactivated"] == languages and table["evaluated"] == languages
        assert table["neurons"] == dict.fromkeys(languages, per_language)
        for changes, metrics in zip(table["change"], table["metric"]):
            for lang, change, metric in zip(languages, changes, metrics):
                assert metric == pytest.approx(table["baseline"][lang] + change)
        diagonal = [table["change"][i][i] for i in range(len(languages))]
        assert table["diagonal"] == pytest.approx(sum(diagonal) / len(diagonal))
        assert f"{name}: perplexity change" in done.stdout
    assert found["masks"]["baseline"] == found["lape"]["baseline"]  # the same batches, ungated
