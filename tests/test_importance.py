"""Head importance and Fisher information against independent computations."""

import copy

import pytest
import torch
from conftest import tiny_transformer
from torch import nn

from subnets.masks.importance import (
    finetuned_copy,
    fisher_information,
    fisher_per_unit,
    normalize_importance,
    unit_importance,
)
from subnets.models.gates import HeadGates


class Gated(nn.Module):
    """A tiny transformer with gates and a regression loss on its outputs."""

    def __init__(self, seed=0):
        super().__init__()
        self.transformer = tiny_transformer(seed=seed).double()
        self.gates = HeadGates(self.transformer)
        self.eval()  # no dropout: finite differences need a deterministic loss

    def loss(self, batch):
        ids, target = batch
        hidden = self.transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return ((hidden - target) ** 2).mean()


def make_batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(5, 120, (3, 9), generator=generator),
            torch.randn(3, 9, 32, generator=generator, dtype=torch.float64),
        )
        for _ in range(count)
    ]


def test_raw_importance_is_the_sum_of_absolute_gate_derivatives_by_finite_differences():
    model, batches = Gated(), make_batches(3)
    raw = unit_importance(model, batches, model.loss, normalize=False)
    eps = 1e-6
    expected = torch.zeros(model.gates.shape, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            for layer in range(2):
                for head in range(4):
                    up, down = torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
                    up[layer, head] += eps
                    down[layer, head] -= eps
                    with model.gates.applied(up):
                        high = model.loss(batch)
                    with model.gates.applied(down):
                        low = model.loss(batch)
                    expected[layer, head] += ((high - low) / (2 * eps)).abs()
    assert torch.allclose(raw.double(), expected, rtol=1e-4, atol=1e-9)


def test_removing_the_most_important_head_changes_the_loss_by_about_the_first_order_estimate():
    model, (batch,) = Gated(seed=1), make_batches(1, seed=1)
    probe = torch.ones(model.gates.shape, dtype=torch.float64, requires_grad=True)
    with model.gates.applied(probe):
        base = model.loss(batch)
    (gradient,) = torch.autograd.grad(base, probe)
    changes = torch.zeros(model.gates.shape, dtype=torch.float64)
    with torch.no_grad():
        for index in range(8):
            gate = torch.ones(model.gates.shape, dtype=torch.float64)
            gate.view(-1)[index] = 0
            with model.gates.applied(gate):
                changes.view(-1)[index] = model.loss(batch) - base
    top = unit_importance(model, [batch], model.loss, normalize=False).flatten().argmax()
    estimate = -gradient.flatten()[top]  # dL ~ dL/dg * (0 - 1)
    assert changes.flatten()[top].item() == pytest.approx(estimate.item(), rel=0.05)
    assert changes.abs().flatten().argmax() == top  # the largest |dL/dg| is the costliest head to remove


def test_normalisation_by_hand():
    raw = torch.tensor([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0]])
    # per-layer L2: [[.6, .8], [.6, .8], [1, 0]]; min-max over all: unchanged (min 0, max 1)
    assert torch.allclose(normalize_importance(raw), torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]]))
    raw = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    # per-layer L2: [[.7071, .7071], [1, 0]] -> min-max: same, since min 0 and max 1
    assert torch.allclose(normalize_importance(raw), torch.tensor([[0.7071068, 0.7071068], [1.0, 0.0]]))
    raw = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    # per-layer L2: [[.3162, .9487]] twice -> min-max: [[0, 1], [0, 1]]
    assert torch.allclose(normalize_importance(raw), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_importance_under_a_mask_leaves_weights_and_mode_alone():
    model, batches = Gated(), make_batches(2)
    model.train()
    mask = torch.ones(2, 4)
    mask[0, :3] = 0
    masked = unit_importance(model, batches, model.loss, mask=mask, normalize=False)
    full = unit_importance(model, batches, model.loss, normalize=False)
    assert not torch.allclose(masked, full)  # scores depend on the mask they are computed under
    assert masked[0, 0] > 0  # a gated-off head still has a derivative (it could be switched on)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.gates.values is None


def test_fisher_is_the_mean_of_squared_per_example_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(3, 1).double()
    xs = torch.randn(5, 3, dtype=torch.float64)
    ys = torch.randn(5, dtype=torch.float64)
    samples = [(x, y) for x, y in zip(xs, ys)]

    def loss(sample):
        x, y = sample
        return (linear(x).squeeze() - y) ** 2

    fisher = fisher_information(linear, samples, loss)
    with torch.no_grad():
        residual = xs @ linear.weight.squeeze() + linear.bias - ys  # d/dw (r^2) = 2 r x, d/db = 2 r
        expected_weight = ((2 * residual[:, None] * xs) ** 2).mean(0)
        expected_bias = ((2 * residual) ** 2).mean()
    assert torch.allclose(fisher["weight"].squeeze(), expected_weight)
    assert torch.allclose(fisher["bias"].squeeze(), expected_bias)
    only = fisher_information(linear, samples, loss, parameters=["bias"])
    assert list(only) == ["bias"]
    with pytest.raises(KeyError, match="nope"):
        fisher_information(linear, samples, loss, parameters=["nope"])
    with pytest.raises(ValueError, match="no batches"):
        fisher_information(linear, [], loss)


def test_fisher_per_unit_sums_each_heads_coordinates():
    model = Gated()
    fisher = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    d, hidden = model.gates.head_dim, 32
    per_head = fisher_per_unit(fisher, model)
    # query, key, value: d rows of `hidden` weights plus d biases each; output: `hidden` x d columns
    assert torch.equal(per_head, torch.full((2, 4), float(3 * (d * hidden + d) + hidden * d)))
    name = "transformer.encoder.layer.1.attention.output.dense.weight"
    fisher[name] = torch.zeros_like(fisher[name])
    fisher[name][:, 2 * d : 3 * d] = 1.5  # only head 2 of layer 1 gets output-projection mass
    per_head = fisher_per_unit(fisher, model)
    assert per_head[1, 2] == 3 * (d * hidden + d) + 1.5 * hidden * d
    assert per_head[1, 0] == 3 * (d * hidden + d)


def test_finetuned_copy_learns_and_leaves_the_original_alone():
    model, batches = Gated(), make_batches(2)
    before = copy.deepcopy(model.state_dict())
    loss_before = sum(model.loss(b) for b in batches).item()
    tuned = finetuned_copy(
        model, batches, steps=30, make_optimizer=lambda m: torch.optim.Adam(m.parameters(), 1e-3),
        loss_fn=lambda m, b: m.loss(b),
    )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(tuned.loss(b) for b in batches).item() < 0.8 * loss_before
    tuned.gates.set(torch.zeros(2, 4))  # the copy's gates are its own
    assert model.gates.values is None
