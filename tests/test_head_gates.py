"""Head gates on BERT- and XLM-R-style encoders, eager and sdpa attention."""

import copy

import pytest
import torch
from conftest import tiny_transformer
from torch import nn

from subnets.models.head_gates import HeadGates, find_attention_layers

ARCHITECTURES = [("bert", "eager"), ("bert", "sdpa"), ("xlm-roberta", "eager"), ("xlm-roberta", "sdpa")]


def inputs(seed=0, batch=3, length=11):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model, **kw):
    return model(**inputs(), **kw).last_hidden_state


@pytest.mark.parametrize("architecture,attn", ARCHITECTURES)
def test_all_ones_equals_ungated_model(architecture, attn):
    model = tiny_transformer(architecture, attn)
    reference = hidden(model)
    gates = HeadGates(model)
    with gates.applied(torch.ones(gates.shape)):
        gated = hidden(model)
    assert torch.equal(gated, reference)
    assert torch.equal(hidden(model), reference)  # no gates set: hooks are a no-op


@pytest.mark.parametrize("architecture,attn", ARCHITECTURES)
def test_zero_gate_equals_zeroed_output_projection_columns(architecture, attn):
    model = tiny_transformer(architecture, attn)
    gates = HeadGates(model)
    layer, head, d = 1, 2, gates.head_dim
    values = torch.ones(gates.shape)
    values[layer, head] = 0
    with gates.applied(values):
        gated = hidden(model)

    reference_model = tiny_transformer(architecture, attn)
    projection = find_attention_layers(reference_model)[layer]["output"]
    with torch.no_grad():
        projection.weight[:, head * d : (head + 1) * d] = 0
    reference = hidden(reference_model)
    assert torch.allclose(gated, reference, atol=1e-6)
    assert not torch.allclose(gated, hidden(model), atol=1e-4)  # the head did matter


@pytest.mark.parametrize("architecture,attn", ARCHITECTURES)
def test_gate_gradient_matches_finite_differences(architecture, attn):
    model = tiny_transformer(architecture, attn).double()
    gates = HeadGates(model)
    target = torch.randn(3, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(values):
        with gates.applied(values):
            return ((hidden(model) - target) ** 2).mean()

    values = torch.rand(gates.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values.requires_grad_(True)
    loss(values).backward()
    assert values.grad.shape == gates.shape
    eps = 1e-6
    for layer, head in [(0, 0), (0, 3), (1, 1)]:
        step = torch.zeros(gates.shape, dtype=torch.float64)
        step[layer, head] = eps
        with torch.no_grad():
            numeric = (loss(values + step) - loss(values - step)) / (2 * eps)
        assert values.grad[layer, head].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)


def test_boolean_gates_and_shape_errors():
    model = tiny_transformer()
    gates = HeadGates(model)
    assert gates.shape == (2, 4) and gates.head_dim == 8
    mask = torch.ones(gates.shape, dtype=torch.bool)
    mask[0, 1] = False
    floats = mask.float()
    with gates.applied(mask):
        from_bool = hidden(model)
    with gates.applied(floats):
        from_float = hidden(model)
    assert torch.equal(from_bool, from_float)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        gates.set(torch.ones(4, 2))


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


def test_unknown_architecture_is_a_clear_error():
    class NotAnEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(NotImplementedError, match="cannot locate attention heads in NotAnEncoder"):
        find_attention_layers(NotAnEncoder())
