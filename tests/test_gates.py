"""Unit gates (heads and neurons) on every transformer family the layouts cover.

Per family, on a tiny random model: gates of 1 give the ungated output bit for bit; a gate of 0
equals zeroing that unit's columns of the output projection; ``dL/dgate`` matches finite
differences; what a unit owns (its parameter masks) is checked against the family's own
weights, and a masked AdamW step through MaskedOptimizer leaves every coordinate of the masked
units bit-identical while the kept ones move.
"""

import copy
import runpy

import pytest
import torch
from conftest import FAMILIES, REPO, tiny_family, tiny_transformer
from torch import nn

from subnets.masks.importance import fisher_per_unit
from subnets.masks.subnetwork import unit_parameter_masks
from subnets.models.gates import HeadGates, NeuronGates, UnitGates
from subnets.models.layouts import (
    AttentionLayout,
    ModelLayout,
    UnknownLayoutError,
    detect_layout,
)
from subnets.optim.masked import MaskedOptimizer

EXPECTED_LAYOUT = {
    "bert": "bert", "xlm-roberta": "bert", "electra": "bert", "rembert": "bert", "distilbert": "distilbert",
    "deberta-v2": "deberta-v2", "xlm": "xlm", "albert": "albert", "modernbert": "modernbert", "t5": "t5",
    "mt5": "t5-gated", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "gemma2": "llama", "gemma3_text": "llama", "gpt2": "gpt2", "gpt_neox": "gpt_neox", "bloom": "bloom",
    "falcon": "bloom",
}  # fmt: skip
CAUSAL = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "bloom",
    "falcon",
}
ATTENTION = [(family, None) for family in FAMILIES] + [("bert", "eager"), ("xlm-roberta", "eager"), ("llama", "eager"),
                                                       ("modernbert", "eager"), ("t5", "eager")]  # fmt: skip


def inputs(seed=0, batch=3, length=11):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model, **kw):
    return model(**inputs(), **kw).last_hidden_state


def name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def test_every_family_is_detected_with_its_layout():
    for family in FAMILIES:
        layout = detect_layout(tiny_family(family))
        assert layout.family == EXPECTED_LAYOUT[family], family
        assert layout.causal == (family in CAUSAL), family


@pytest.mark.parametrize("family,attn", ATTENTION)
@pytest.mark.parametrize("units", ["heads", "neurons"])
def test_gates_of_one_give_the_ungated_output_bit_for_bit(family, attn, units):
    model = tiny_family(family, attn)
    reference = hidden(model)
    gates = UnitGates(model, units)
    with gates.applied(torch.ones(gates.shape)):
        assert torch.equal(hidden(model), reference)
    assert torch.equal(hidden(model), reference)  # no gates set: the hooks do nothing


@pytest.mark.parametrize("family,attn", ATTENTION)
@pytest.mark.parametrize("units", ["heads", "neurons"])
def test_a_zero_gate_equals_zeroed_output_projection_columns(family, attn, units):
    """At every depth (ALBERT's one shared layer serves them all, so all its depths are gated)."""
    model = tiny_family(family, attn)
    gates = UnitGates(model, units)
    unit = 1
    width = gates.head_dim if units == "heads" else 1
    values = torch.ones(gates.shape)
    values[:, unit] = 0
    with gates.applied(values):
        gated = hidden(model)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        for output in {id(o): o for o in gates.outputs[units]}.values():
            reference_weight = dict(reference_model.named_modules())[name_of(model, output)].weight
            if conv1d(output):  # GPT-2: the weight is [in, out]
                reference_weight[unit * width : (unit + 1) * width] = 0
            else:
                reference_weight[:, unit * width : (unit + 1) * width] = 0
    assert torch.allclose(gated, hidden(reference_model), atol=1e-6)
    assert not torch.allclose(gated, hidden(model), atol=1e-4)  # the unit did matter


@pytest.fixture
def float64_throughout(monkeypatch):
    """Every cast to float32 gives float64: RMSNorm (Llama, Qwen, Gemma, Mistral), T5's layer
    norm, rotary embeddings and the decoders' and XLM's softmax compute in float32 on purpose,
    and float32 rounding would swamp a finite difference; the gates' derivative is what is
    tested, in float64 throughout."""
    to, softmax = torch.Tensor.to, torch.nn.functional.softmax

    def to64(self, *args, **kwargs):
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to64)
    monkeypatch.setattr(torch.Tensor, "float", lambda self: to(self, torch.float64))
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None, **kw: softmax(
        x, dim=dim, dtype=torch.float64 if dtype is torch.float32 else dtype, **kw))  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("units", ["heads", "neurons"])
def test_gate_gradients_match_finite_differences(family, units, float64_throughout):
    model = tiny_family(family, "eager").double()
    gates = UnitGates(model, units)
    size = model.config.hidden_size
    target = torch.randn(3, 11, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(values):
        with gates.applied(values):
            return ((hidden(model) - target) ** 2).mean()

    values = torch.rand(gates.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values.requires_grad_(True)
    loss(values).backward()
    eps = 1e-6
    last = gates.shape[1] - 1
    for layer, unit in [(0, 0), (0, last), (gates.num_layers - 1, 1)]:
        step = torch.zeros(gates.shape, dtype=torch.float64)
        step[layer, unit] = eps
        with torch.no_grad():
            numeric = (loss(values + step) - loss(values - step)) / (2 * eps)
        assert values.grad[layer, unit].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)


def _expected_head_rows(
    gates: UnitGates, mask: torch.Tensor, layer: int, kv_heads: int | None
) -> torch.Tensor:
    """Rows of a query (``kv_heads`` None) or key/value projection a head mask keeps, from the geometry."""
    d, heads = gates.head_dim, gates.num_heads
    if kv_heads is None:
        return mask[layer].repeat_interleave(d)
    group = heads // kv_heads
    return mask[layer].view(kv_heads, group).any(dim=1).repeat_interleave(d)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "albert"])
def test_head_parameter_masks_own_the_families_query_key_value_rows_and_output_columns(family):
    model = tiny_family(family)
    gates = HeadGates(model)
    config = model.config
    kv_heads = (
        getattr(config, "num_key_value_heads", None)
        or getattr(config, "num_kv_heads", None)
        or gates.num_heads
    )
    mask = torch.zeros(gates.shape, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    masks = unit_parameter_masks(model, mask, gates)
    attention = gates.layout.attention
    layers = dict(model.named_modules())
    layer_names = [name_of(model, output) for output in gates.outputs["heads"]]
    for layer, output_name in enumerate(layer_names):
        columns = mask[layer].repeat_interleave(gates.head_dim)
        columns = columns[:, None] if conv1d(layers[output_name]) else columns[None, :]
        assert torch.equal(masks[f"{output_name}.weight"], columns.expand_as(layers[output_name].weight))
        prefix = output_name[: -len(attention.output)]
        if attention.qkv:
            blocks = {role: _expected_head_rows(gates, mask, layer, None if role == "query" else kv_heads)
                      for role in attention.qkv_order}  # fmt: skip
            if attention.qkv_layout == "interleaved":  # per key-value head: its query heads, key, value
                d, group = gates.head_dim, gates.num_heads // kv_heads
                size = {"query": group * d, "key": d, "value": d}
                rows = torch.cat([blocks[role][g * size[role] : (g + 1) * size[role]]
                                  for g in range(kv_heads) for role in attention.qkv_order])  # fmt: skip
            else:
                rows = torch.cat([blocks[role] for role in attention.qkv_order])
            fused = masks[f"{prefix}{attention.qkv}.weight"]
            assert torch.equal(fused[0, :] if conv1d(layers[prefix + attention.qkv]) else fused[:, 0], rows)
            continue
        for role in ("query", "key", "value"):
            name = prefix + getattr(attention, role)
            rows = _expected_head_rows(gates, mask, layer, None if role == "query" else kv_heads)
            assert torch.equal(masks[f"{name}.weight"], rows[:, None].expand_as(layers[name].weight)), (
                family,
                role,
            )
            if f"{name}.bias" in dict(model.named_parameters()):
                assert torch.equal(masks[f"{name}.bias"], rows)
    heads_only = set(masks)
    assert not any("embed" in n or "norm" in n.lower() for n in heads_only)  # shared by every language


def test_grouped_query_attention_freezes_a_key_value_head_only_with_its_whole_group():
    model = tiny_family("qwen2")  # 4 query heads, 2 key-value heads: groups {0, 1} and {2, 3}
    gates = HeadGates(model)
    mask = torch.ones(gates.shape, dtype=torch.bool)
    mask[0, 0] = False  # one head of group 0 out: the group's key-value head still learns
    mask[0, 2] = mask[0, 3] = False  # the whole group 1 out: its key-value head is frozen
    masks = unit_parameter_masks(model, mask, gates)
    d = gates.head_dim
    key = masks["layers.0.self_attn.k_proj.weight"][:, 0]
    assert key[:d].all() and not key[d:].any()
    assert torch.equal(masks["layers.0.self_attn.k_proj.bias"], key)  # Qwen2 has key biases
    query = masks["layers.0.self_attn.q_proj.weight"][:, 0]
    assert torch.equal(query, torch.tensor([False, True, False, False]).repeat_interleave(d))


def test_albert_shared_weights_are_frozen_only_where_every_depth_masks_the_unit():
    model = tiny_family("albert")  # one physical layer, 3 depths
    gates = UnitGates(model, "both")
    heads = gates.units["heads"]
    mask = torch.ones(gates.shape, dtype=torch.bool)
    mask[0, 1] = False  # head 1 masked at depth 0 only: kept elsewhere, so it still learns
    mask[:, 2] = False  # head 2 masked at every depth: frozen
    mask[:, heads + 3] = False  # neuron 3 masked at every depth
    masks = unit_parameter_masks(model, mask, gates)
    d = gates.head_dim
    prefix = "encoder.albert_layer_groups.0.albert_layers.0."
    rows = masks[prefix + "attention.query.weight"][:, 0]
    assert rows[d : 2 * d].all() and not rows[2 * d : 3 * d].any()
    assert not masks[prefix + "ffn.weight"][3].any() and masks[prefix + "ffn.weight"][4].all()
    assert not masks[prefix + "ffn_output.weight"][:, 3].any()


def test_albert_gates_each_depth_of_its_shared_layer_on_its_own():
    model = tiny_family("albert")
    gates = HeadGates(model)
    values = torch.ones(gates.shape)
    values[1, 0] = 0  # depth 1 only
    with gates.applied(values):
        once = hidden(model)
        assert torch.equal(hidden(model), once)  # the depth counter restarts with every forward
    values[0, 0] = values[2, 0] = 0
    with gates.applied(values):
        everywhere = hidden(model)
    assert not torch.allclose(once, everywhere, atol=1e-4)
    assert not torch.allclose(once, hidden(model), atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "modernbert", "mt5", "qwen2", "albert", "xlm"])
@pytest.mark.parametrize("units", ["heads", "neurons", "both"])
def test_a_masked_adamw_step_leaves_the_masked_units_bit_identical(family, units):
    model = tiny_family(family).train()
    gates = UnitGates(model, units)
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(gates.shape, generator=generator) < 0.5
    update_mask = unit_parameter_masks(model, mask, gates)
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = MaskedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model.named_parameters()
    )
    for _ in range(2):
        optimizer.zero_grad()
        hidden(model).pow(2).mean().backward()
        optimizer.step(update_mask=update_mask)
    for name, keep in update_mask.items():
        after = named[name].detach()
        assert torch.equal(after[~keep], before[name][~keep]), name
        if keep.any():
            assert not torch.equal(after[keep], before[name][keep]), name


@pytest.mark.parametrize("family", ["bert", "qwen2", "modernbert", "albert"])
def test_fisher_per_unit_sums_the_owned_coordinates_and_shares_the_shared_ones(family):
    model = tiny_family(family)
    gates = UnitGates(model, "both")
    generator = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=generator) for n, p in model.named_parameters()}
    scores = fisher_per_unit(fisher, model, gates)
    owned = unit_parameter_masks(model, torch.ones(gates.shape, dtype=torch.bool), gates)
    total = sum(float(fisher[n][m].double().sum()) for n, m in owned.items())
    assert float(scores.double().sum()) == pytest.approx(total, rel=1e-5)
    if family == "bert":  # head 1 of layer 0 by hand: its q/k/v rows and biases, its output columns
        d, p = gates.head_dim, "encoder.layer.0.attention."
        rows = slice(d, 2 * d)
        by_hand = sum(float(fisher[f"{p}self.{r}.weight"][rows].sum() + fisher[f"{p}self.{r}.bias"][rows].sum())
                      for r in ("query", "key", "value")) + float(fisher[f"{p}output.dense.weight"][:, rows].sum())  # fmt: skip
        assert float(scores[0, 1]) == pytest.approx(by_hand, rel=1e-5)
        neuron = float(fisher["encoder.layer.0.intermediate.dense.weight"][5].sum()
                       + fisher["encoder.layer.0.intermediate.dense.bias"][5]
                       + fisher["encoder.layer.0.output.dense.weight"][:, 5].sum())  # fmt: skip
        assert float(scores[0, gates.units["heads"] + 5]) == pytest.approx(neuron, rel=1e-5)


def test_neuron_gates_of_a_fused_modernbert_input_own_both_halves():
    model = tiny_family("modernbert")
    gates = NeuronGates(model)
    mask = torch.zeros(gates.shape, dtype=torch.bool)
    mask[0, 7] = True
    masks = unit_parameter_masks(model, mask, gates)
    rows = masks["layers.0.mlp.Wi.weight"][:, 0]
    assert rows.nonzero().flatten().tolist() == [7, 7 + gates.num_neurons]  # the input and its gate
    assert masks["layers.0.mlp.Wo.weight"][0].nonzero().flatten().tolist() == [7]


def test_boolean_gates_and_shape_errors():
    model = tiny_transformer()
    gates = HeadGates(model)
    assert gates.shape == (2, 4) and gates.head_dim == 8
    mask = torch.ones(gates.shape, dtype=torch.bool)
    mask[0, 1] = False
    with gates.applied(mask):
        from_bool = hidden(model)
    with gates.applied(mask.float()):
        from_float = hidden(model)
    assert torch.equal(from_bool, from_float)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        gates.set(torch.ones(4, 2))
    both = UnitGates(model, "both")
    assert both.units == {"heads": 4, "neurons": 64} and both.shape == (2, 68)


def test_applied_restores_previous_gates_and_remove_detaches():
    model = tiny_transformer()
    gates = HeadGates(model)
    outer = torch.ones(gates.shape)
    with gates.applied(outer):
        with gates.applied(torch.zeros(gates.shape)):
            pass
        assert gates.values is outer
    assert gates.values is None
    reference = hidden(model)
    gates.set(torch.zeros(gates.shape))
    gates.remove()
    assert torch.equal(hidden(model), reference)


def test_deepcopy_gives_independent_gates():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = tiny_transformer()
            self.gates = HeadGates(self.transformer)

    original = Wrapper()
    reference = hidden(original.transformer)
    clone = copy.deepcopy(original)
    clone.gates.set(torch.zeros(clone.gates.shape))
    assert original.gates.values is None
    assert torch.equal(hidden(original.transformer), reference)
    assert not torch.allclose(hidden(clone.transformer), reference, atol=1e-4)


# The toy encoder of examples/custom_layout.py (its own names for everything: no known layout fits)
CUSTOM_LAYOUT = runpy.run_path(str(REPO / "examples" / "custom_layout.py"))


def test_an_unknown_model_is_an_error_that_says_what_to_declare_and_a_declared_layout_works():
    model = CUSTOM_LAYOUT["MyEncoder"]()
    with pytest.raises(UnknownLayoutError, match="Declare its layout: model.layout"):
        HeadGates(model)
    layout = CUSTOM_LAYOUT["LAYOUT"]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cannot probe the layout of MyEncoder with token ids"):
        UnitGates(model, "both", layout=layout)
    gates = UnitGates(model, "both", layout=layout, check=lambda m: m(x))  # the probe runs the model on x
    assert gates.units == {"heads": 2, "neurons": 16} and gates.head_dim == 4
    reference = model(x)
    values = torch.ones(gates.shape)
    with gates.applied(values):
        assert torch.equal(model(x), reference)
    values[1, 0] = 0
    with gates.applied(values):
        gated = model(x)
    with torch.no_grad():
        model.blocks[1]["proj"].weight[:, :4] = 0
    assert torch.allclose(gated, model(x), atol=1e-6)
    wrong = ModelLayout(AttentionLayout(layers="blocks", output="out", qkv="qkv"))
    with pytest.raises(UnknownLayoutError, match="does not fit MyEncoder"):
        HeadGates(model, layout=wrong)
