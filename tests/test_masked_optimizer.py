"""Property tests of :class:`subnets.optim.MaskedOptimizer` against its class docstring.

For a masked step: coordinates outside the mask keep their value and every per-coordinate
optimizer state bit-identical (state created by the step is zero there); a tensor masked
entirely keeps its whole state, counters included; coordinates inside the mask move exactly as
the bare optimizer moves them given the masked gradient; a step without a mask is the bare step.
The reference for every step is a deep copy of (parameters, wrapped optimizer) taken just before it.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from subnets.optim import MaskedOptimizer, UpdateMask

LRS = (0.1, 0.03)  # the two parameter groups' learning rates

KINDS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda groups: torch.optim.SGD(
        groups, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True
    ),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    "adam_decay": lambda groups: torch.optim.Adam(groups, lr=0.01, weight_decay=0.1),  # coupled decay
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
    "adam_amsgrad": lambda groups: torch.optim.Adam(groups, lr=0.01, amsgrad=True),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.9),
    "rmsprop_centered": lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.9, centered=True),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1),
    "adamax": lambda groups: torch.optim.Adamax(groups, lr=0.01),
}
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (4, 1), (1, 4), (2, 5)]


# ---------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Step:
    style: str  # "none": step(); "empty": step(update_mask={}); "masked": step(update_mask=...)
    masks: tuple[tuple[int, tuple[bool, ...], bool], ...]  # (parameter index, flat mask, key by name)
    no_grad: int | None  # index of a parameter left with grad None, if any


@dataclass(frozen=True)
class Scenario:
    kind: str
    shapes: tuple[tuple[int, ...], ...]
    split: int  # parameters [:split] in group 0 (lr LRS[0]), the rest in group 1 (lr LRS[1])
    seed: int
    steps: tuple[Step, ...]


@st.composite
def flat_masks(draw, shape: tuple[int, ...]) -> tuple[bool, ...]:
    """All-True, all-False, random, or (2-D) whole rows / whole columns, as head masks are."""
    numel = math.prod(shape)
    fills = ["all_true", "all_false", "partial", "partial"] + (["rows", "columns"] if len(shape) == 2 else [])
    fill = draw(st.sampled_from(fills))
    if fill == "all_true":
        return (True,) * numel
    if fill == "all_false":
        return (False,) * numel
    if fill == "rows":
        rows = draw(st.lists(st.booleans(), min_size=shape[0], max_size=shape[0]))
        return tuple(rows[r] for r in range(shape[0]) for _ in range(shape[1]))
    if fill == "columns":
        columns = draw(st.lists(st.booleans(), min_size=shape[1], max_size=shape[1]))
        return tuple(columns[c] for _ in range(shape[0]) for c in range(shape[1]))
    return tuple(draw(st.lists(st.booleans(), min_size=numel, max_size=numel)))


@st.composite
def steps(draw, shapes) -> Step:
    n = len(shapes)
    # fixed: the masks as an UpdateMask, the same object whenever the same masks recur
    style = draw(st.sampled_from(["none", "empty", "masked", "masked", "masked", "fixed", "fixed"]))
    no_grad = draw(st.sampled_from([None, None, None, None, *range(n)]))
    if style not in ("masked", "fixed"):
        return Step(style, (), no_grad)
    keys = draw(st.sampled_from(["name", "param", "mixed"]))
    chosen = draw(st.sets(st.integers(0, n - 1), min_size=1))
    masks = []
    for i in sorted(chosen):
        flat = draw(flat_masks(shapes[i]))
        by_name = keys == "name" or (keys == "mixed" and draw(st.booleans()))
        masks.append((i, flat, by_name))
    return Step(style, tuple(masks), no_grad)


@st.composite
def scenarios(draw, min_steps=1, max_steps=6) -> Scenario:
    kind = draw(st.sampled_from(sorted(KINDS)))
    shapes = tuple(draw(st.lists(st.sampled_from(SHAPES), min_size=2, max_size=3)))
    split = draw(st.integers(1, len(shapes) - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    sequence = draw(st.lists(steps(shapes), min_size=min_steps, max_size=max_steps))
    return Scenario(kind, shapes, split, seed, tuple(sequence))


# ---------------------------------------------------------------------------- helpers
def make_optimizer(kind, params, split):
    return KINDS[kind]([{"params": params[:split], "lr": LRS[0]}, {"params": params[split:], "lr": LRS[1]}])


def build(scenario: Scenario):
    gen = torch.Generator().manual_seed(scenario.seed)
    params = [nn.Parameter(torch.randn(shape, generator=gen)) for shape in scenario.shapes]
    names = [f"layer{i}.weight" for i in range(len(params))]
    inner = make_optimizer(scenario.kind, params, scenario.split)
    return params, names, inner, MaskedOptimizer(inner, zip(names, params)), gen


def per_coordinate(value, parameter) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == parameter.shape


def assert_state_equal(actual, expected, what):
    actual, expected = actual or {}, expected or {}
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(actual[key], value), f"{what}: state[{key!r}]"
        else:
            assert actual[key] == value, f"{what}: state[{key!r}]"


def draw_gradients(params, step: Step, gen):
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if step.no_grad is not None:
        grads[step.no_grad] = None
    return grads


def step_masks(params, step: Step, pool: dict | None = None):
    """{parameter index: boolean mask} of the step (empty for unmasked steps). With ``pool``, a
    mask seen before is the same tensor object again (as a training loop reuses its masks)."""
    masks = {}
    for i, flat, _ in step.masks:
        if pool is None or (i, flat) not in pool:
            mask = torch.tensor(flat, dtype=torch.bool).reshape(params[i].shape)
            if pool is not None:
                pool[i, flat] = mask
        masks[i] = mask if pool is None else pool[i, flat]
    return masks


def update_mask_of(params, names, step: Step, masks):
    return {(names[i] if by_name else params[i]): masks[i] for i, _, by_name in step.masks}


def run_step(wrapper, params, names, step: Step, grads, masks, pool=None):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    if step.style == "none":
        wrapper.step()
    elif step.style == "empty":
        wrapper.step(update_mask={})
    elif step.style == "fixed":
        pool = {} if pool is None else pool
        fixed = pool.setdefault(("fixed", step.masks), UpdateMask(update_mask_of(params, names, step, masks)))
        wrapper.step(update_mask=fixed)
    else:
        wrapper.step(update_mask=update_mask_of(params, names, step, masks))


def checked_step(params, names, inner, wrapper, step: Step, grads, pool=None):
    """One step of the wrapper, checked against the docstring and against a bare reference."""
    masks = step_masks(params, step, pool)
    values_before = [p.detach().clone() for p in params]
    states_before = [copy.deepcopy(inner.state[p]) if p in inner.state else None for p in params]

    ref_params, ref_inner = copy.deepcopy((params, inner))
    for i, (rp, g) in enumerate(zip(ref_params, grads)):
        rp.grad = None if g is None else (g.masked_fill(~masks[i], 0.0) if i in masks else g.clone())
    ref_inner.step()

    run_step(wrapper, params, names, step, grads, masks, pool)

    for i, (p, rp) in enumerate(zip(params, ref_params)):
        state, ref_state = inner.state.get(p), ref_inner.state.get(rp)
        what = f"step {step}, parameter {i}"
        assert (p.grad is None) == (grads[i] is None), f"{what}: gradient dropped or invented"
        if i not in masks:  # not in the mask (or no mask at all): the bare step, exactly
            assert torch.equal(p, rp), what
            assert_state_equal(state, ref_state, what)
            continue
        mask = masks[i]
        frozen = ~mask
        # (a) masked-out coordinates: value bit-identical
        assert torch.equal(p[frozen], values_before[i][frozen]), what
        if not mask.any():  # masked entirely: skipped, state and counters untouched
            if states_before[i] is None:
                assert not state, f"{what}: state created for a tensor masked entirely"
            else:
                assert_state_equal(state, states_before[i], what)
            continue
        before = states_before[i] or {}
        for key, value in (state or {}).items():
            if not per_coordinate(value, p):
                continue
            if key in before:  # frozen, not advanced
                assert torch.equal(value[frozen], before[key][frozen]), f"{what}: state[{key!r}] moved"
            else:  # created by this step: zero at masked coordinates
                assert torch.equal(value[frozen], torch.zeros_like(value[frozen])), f"{what}: new {key!r}"
        if grads[i] is not None:  # the gradient is zeroed at masked coordinates, kept elsewhere
            assert torch.equal(p.grad[frozen], torch.zeros_like(p.grad[frozen])), what
            assert torch.equal(p.grad[mask], grads[i][mask]), what
        # (b) masked-in coordinates: exactly the bare optimizer on the masked gradient
        assert torch.equal(p[mask], rp[mask]), what
        assert (state or {}).keys() == (ref_state or {}).keys(), what
        for key, ref_value in (ref_state or {}).items():
            value = state[key]
            if per_coordinate(ref_value, rp):
                assert torch.equal(value[mask], ref_value[mask]), f"{what}: state[{key!r}]"
            elif torch.is_tensor(ref_value):
                assert torch.equal(value, ref_value), f"{what}: state[{key!r}]"
            else:
                assert value == ref_value, f"{what}: state[{key!r}]"


# ---------------------------------------------------------------------------- 1. properties
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_masked_steps_are_exact(scenario: Scenario):
    params, names, inner, wrapper, gen = build(scenario)
    assert wrapper.state is inner.state and wrapper.param_groups is inner.param_groups
    pool = {}
    for step in scenario.steps:
        checked_step(params, names, inner, wrapper, step, draw_gradients(params, step, gen), pool)
    assert [g["lr"] for g in inner.param_groups] == list(LRS)


# ---------------------------------------------------------------------------- 2. re-entry
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_masked_coordinate_resumes_from_frozen_state(kind):
    gen = torch.Generator().manual_seed(3)
    p, other = nn.Parameter(torch.randn(5, generator=gen)), nn.Parameter(torch.randn(2, 3, generator=gen))
    inner = make_optimizer(kind, [p, other], 1)
    wrapper = MaskedOptimizer(inner, [("p", p), ("other", other)])
    c = 2
    keep_c = torch.ones(5, dtype=torch.bool)
    keep_c[c] = False

    for _ in range(2):  # unmasked steps first: nonzero state at c
        p.grad, other.grad = torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)
        wrapper.step()
    frozen_state = {k: v[c].clone() for k, v in inner.state[p].items() if per_coordinate(v, p)}
    frozen_value = p[c].detach().clone()
    assert frozen_state and all(v != 0 for v in frozen_state.values())

    for _ in range(3):
        p.grad, other.grad = torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)
        wrapper.step(update_mask={"p": keep_c})
    for key, value in frozen_state.items():
        assert torch.equal(inner.state[p][key][c], value), key
    assert torch.equal(p[c], frozen_value)

    grads = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    ref_params, ref_inner = copy.deepcopy(([p, other], inner))
    for rp, g in zip(ref_params, grads):
        rp.grad = g.clone()
    ref_inner.step()
    p.grad, other.grad = grads[0].clone(), grads[1].clone()
    wrapper.step(update_mask={p: torch.ones(5, dtype=torch.bool)})
    assert torch.equal(p, ref_params[0]) and torch.equal(other, ref_params[1])
    assert_state_equal(inner.state[p], ref_inner.state[ref_params[0]], kind)
    assert not torch.equal(p[c], frozen_value)


def test_adam_moments_and_counter_freeze_and_resume():
    gen = torch.Generator().manual_seed(7)
    p = nn.Parameter(torch.randn(4, generator=gen))
    inner = torch.optim.Adam([p], lr=0.01)
    wrapper = MaskedOptimizer(inner, [("p", p)])
    p.grad = torch.randn(4, generator=gen)
    wrapper.step()
    state = inner.state[p]
    c = 1
    exp_avg, exp_avg_sq = state["exp_avg"][c].clone(), state["exp_avg_sq"][c].clone()

    mask = torch.tensor([True, False, True, True])
    for expected_step in (2.0, 3.0, 4.0):  # the per-tensor counter advances: part of it is updated
        p.grad = torch.randn(4, generator=gen)
        wrapper.step(update_mask={"p": mask})
        assert float(state["step"]) == expected_step
    assert torch.equal(state["exp_avg"][c], exp_avg) and torch.equal(state["exp_avg_sq"][c], exp_avg_sq)

    all_state = copy.deepcopy(state)
    for _ in range(3):  # masked entirely: skipped, counter included
        p.grad = torch.randn(4, generator=gen)
        wrapper.step(update_mask={p: torch.zeros(4, dtype=torch.bool)})
    assert_state_equal(state, all_state, "masked entirely")

    g = torch.randn(4, generator=gen)
    (ref,), ref_inner = copy.deepcopy(([p], inner))
    ref.grad = g.clone()
    ref_inner.step()
    p.grad = g.clone()
    wrapper.step(update_mask={"p": torch.ones(4, dtype=torch.bool)})
    beta1, beta2 = inner.param_groups[0]["betas"]
    assert torch.equal(p, ref) and float(state["step"]) == 5.0
    assert torch.equal(state["exp_avg"], ref_inner.state[ref]["exp_avg"])
    assert torch.allclose(state["exp_avg"][c], beta1 * exp_avg + (1 - beta1) * g[c])
    assert torch.allclose(state["exp_avg_sq"][c], beta2 * exp_avg_sq + (1 - beta2) * g[c] ** 2)


# ---------------------------------------------------------------------------- 3. state_dict
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(min_steps=2), st.integers(0, 6), st.data())
def test_state_dict_round_trip(scenario: Scenario, cut, data):
    params, names, inner, wrapper, gen = build(scenario)
    cut = min(cut, len(scenario.steps))
    for step in scenario.steps[:cut]:
        run_step(wrapper, params, names, step, draw_gradients(params, step, gen), step_masks(params, step))

    buffer = io.BytesIO()
    torch.save(wrapper.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    fresh_inner = make_optimizer(scenario.kind, params2, scenario.split)
    wrapper2 = MaskedOptimizer(fresh_inner, zip(names, params2))
    wrapper2.load_state_dict(saved)
    assert wrapper2.state is wrapper2.optimizer.state is fresh_inner.state
    assert wrapper2.param_groups is wrapper2.optimizer.param_groups is fresh_inner.param_groups
    assert [g["lr"] for g in wrapper2.param_groups] == [g["lr"] for g in wrapper.param_groups]
    for p, p2 in zip(params, params2):
        assert_state_equal(fresh_inner.state.get(p2), inner.state.get(p), "after load")

    for step in scenario.steps[cut:]:
        grads, masks = draw_gradients(params, step, gen), step_masks(params, step)
        run_step(wrapper, params, names, step, grads, masks)
        run_step(wrapper2, params2, names, step, grads, {i: m.clone() for i, m in masks.items()})
        for i, (p, p2) in enumerate(zip(params, params2)):
            assert torch.equal(p, p2), f"{step}, parameter {i}"
            assert_state_equal(fresh_inner.state.get(p2), inner.state.get(p), f"{step}, parameter {i}")


# ---------------------------------------------------------------------------- 4. schedulers
SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1 / (1 + s)]),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
}
EXPECTED_FACTOR = {
    "lambda": lambda group, s: (0.5**s, 1 / (1 + s))[group],
    "step": lambda group, s: 0.5 ** (s // 2),
}


@pytest.mark.parametrize("scheduler_kind", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", ["adamw", "sgd", "rmsprop"])
def test_scheduler_on_wrapper_drives_inner_learning_rates(kind, scheduler_kind):
    gen = torch.Generator().manual_seed(11)
    params = [nn.Parameter(torch.randn(3, 4, generator=gen)), nn.Parameter(torch.randn(5, generator=gen))]
    bare_params = [nn.Parameter(p.detach().clone()) for p in params]
    mask = torch.rand(3, 4, generator=gen) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        inner = make_optimizer(kind, params, 1)
        wrapper = MaskedOptimizer(inner, [("w", params[0]), ("b", params[1])])
        bare = make_optimizer(kind, bare_params, 1)
        scheduler, bare_scheduler = SCHEDULERS[scheduler_kind](wrapper), SCHEDULERS[scheduler_kind](bare)
        for s in range(6):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            frozen_value = params[0][~mask].clone()
            for p, bp, g in zip(params, bare_params, grads):
                p.grad, bp.grad = g.clone(), g.clone()
            bare_params[0].grad.masked_fill_(~mask, 0.0)
            wrapper.step(update_mask={"w": mask})
            bare.step()
            assert torch.equal(params[0][mask], bare_params[0][mask])
            assert torch.equal(params[0][~mask], frozen_value)
            assert torch.equal(params[1], bare_params[1])
            scheduler.step()
            bare_scheduler.step()
            for group in range(2):
                expected = LRS[group] * EXPECTED_FACTOR[scheduler_kind](group, s + 1)
                lr = inner.param_groups[group]["lr"]
                assert lr == wrapper.param_groups[group]["lr"] == bare.param_groups[group]["lr"]
                assert lr == pytest.approx(expected)
            assert scheduler.get_last_lr() == bare_scheduler.get_last_lr()


def test_scheduler_warns_when_stepped_before_the_wrapper():
    """The positive control for the no-warning check above: the wrong order is detected."""
    p = nn.Parameter(torch.randn(3))
    wrapper = MaskedOptimizer(torch.optim.Adam([p], lr=0.1), [("p", p)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper, lambda s: 0.5**s)
    with pytest.warns(UserWarning, match=r"lr_scheduler\.step\(\)"):
        scheduler.step()


def test_param_group_added_through_wrapper_reaches_inner_optimizer():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    inner = torch.optim.Adam([a], lr=0.1)
    wrapper = MaskedOptimizer(inner, [("a", a), ("b", b)])
    wrapper.add_param_group({"params": [b], "lr": 0.5})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["lr"] == 0.5
    assert wrapper.param_groups is inner.param_groups
    before = b.detach().clone()
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    wrapper.step(update_mask={"b": torch.tensor([True, False])})
    assert b[1] == before[1] and b[0] != before[0]


# ---------------------------------------------------------------------------- 5. errors
@pytest.mark.parametrize("by_name", [True, False])
def test_mask_of_wrong_shape_raises_value_error_naming_both_shapes(by_name):
    w = nn.Parameter(torch.randn(3, 4))
    wrapper = MaskedOptimizer(torch.optim.AdamW([w], lr=0.1), [("w", w)])
    w.grad = torch.randn(3, 4)
    before = w.detach().clone()
    with pytest.raises(ValueError) as error:
        wrapper.step(update_mask={("w" if by_name else w): torch.ones(4, 3, dtype=torch.bool)})
    assert "(4, 3)" in str(error.value) and "(3, 4)" in str(error.value)
    if by_name:
        assert "'w'" in str(error.value) or "w:" in str(error.value)
    assert torch.equal(w, before) and not wrapper.state


def test_unknown_parameter_name_raises_key_error_naming_it():
    w = nn.Parameter(torch.randn(3))
    wrapper = MaskedOptimizer(torch.optim.SGD([w], lr=0.1), [("w", w)])
    w.grad = torch.randn(3)
    before = w.detach().clone()
    with pytest.raises(KeyError, match="encoder.no_such_weight"):
        wrapper.step(update_mask={"encoder.no_such_weight": torch.ones(3, dtype=torch.bool)})
    assert torch.equal(w, before)


def test_failed_validation_leaves_gradients_alone():
    """Every mask is validated before any gradient is touched.

    Regression (commit e557a66): a mask failing validation (wrong shape, unknown name) after a
    valid all-False mask left that earlier parameter's ``.grad`` set to None (a partial mask's
    gradient zeroed), although no step was taken; a retried step then silently skipped it.
    """
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    wrapper = MaskedOptimizer(torch.optim.SGD([a, b], lr=0.1), [("a", a), ("b", b)])
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError):
        wrapper.step(
            update_mask={"a": torch.zeros(3, dtype=torch.bool), "b": torch.ones(3, dtype=torch.bool)}
        )
    assert a.grad is not None and torch.equal(a.grad, torch.ones(3))
    with pytest.raises(KeyError):
        wrapper.step(update_mask={"a": torch.tensor([True, False, True]), "nope": torch.ones(1)})
    assert torch.equal(a.grad, torch.ones(3))


# ---------------------------------------------------------------------------- 6. grad None
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_parameter_without_gradient_in_mask_is_left_alone(kind):
    gen = torch.Generator().manual_seed(5)
    a, b, c = (nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(3, 4), (5,), (2, 3)])
    inner = make_optimizer(kind, [a, b, c], 2)
    wrapper = MaskedOptimizer(inner, [("a", a), ("b", b), ("c", c)])
    partial = torch.rand(3, 4, generator=gen) < 0.5
    for first in (True, False):  # without state, then with state
        if not first:
            for p in (a, b, c):
                p.grad = torch.randn(p.shape, generator=gen)
            wrapper.step()
        values = [p.detach().clone() for p in (a, b, c)]
        states = [copy.deepcopy(inner.state[p]) if p in inner.state else None for p in (a, b)]
        a.grad, b.grad, c.grad = None, None, torch.randn(2, 3, generator=gen)
        wrapper.step(update_mask={"a": partial, b: torch.zeros(5, dtype=torch.bool)})
        assert torch.equal(a, values[0]) and torch.equal(b, values[1]) and not torch.equal(c, values[2])
        assert a.grad is None and b.grad is None
        for p, state in zip((a, b), states):
            if state is None:
                assert not inner.state.get(p)
            else:
                assert_state_equal(inner.state[p], state, "grad None")


# ---------------------------------------------------------------------------- reused masks
def test_mask_changed_without_version_bump_is_not_read_stale():
    """A reused mask rewritten without a version bump (through ``.data``, or a NumPy array sharing
    its memory) is read anew. Regression (commit e557a66): the frozen-index cache trusted
    ``id(mask)`` and ``mask._version``, so the step used the old mask and moved protected
    coordinates."""
    p = nn.Parameter(torch.zeros(4))
    wrapper = MaskedOptimizer(torch.optim.SGD([p], lr=0.1), [("p", p)])
    mask = torch.tensor([True, False, True, False])
    p.grad = torch.ones(4)
    wrapper.step(update_mask={"p": mask})
    mask.data.copy_(torch.tensor([False, True, True, True]))
    before = p.detach().clone()
    p.grad = torch.ones(4)
    wrapper.step(update_mask={"p": mask})
    assert p[0] == before[0], "coordinate 0 is masked out by the current mask but moved"


def test_mask_changed_in_place_is_read_anew():
    """A reused mask changed in place (the ordinary way) is read anew."""
    p = nn.Parameter(torch.zeros(2, 3))
    wrapper = MaskedOptimizer(torch.optim.AdamW([p], lr=0.1, weight_decay=0.1), [("p", p)])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    p.grad = torch.ones(2, 3)
    wrapper.step(update_mask={"p": mask})
    assert torch.equal(p[1], torch.zeros(3)) and bool((p[0] != 0).all())
    mask[0, 1] = False
    mask[1, 2] = True
    before = p.detach().clone()
    p.grad = torch.ones(2, 3)
    wrapper.step(update_mask={"p": mask})
    assert torch.equal(p[~mask], before[~mask]) and bool((p[mask] != before[mask]).all())


def test_mask_created_in_inference_mode_is_accepted():
    """Regression (commit e557a66): the cache read ``mask._version``, which inference tensors do
    not have: a mask built under ``torch.inference_mode()`` made every masked step raise."""
    p = nn.Parameter(torch.zeros(4))
    wrapper = MaskedOptimizer(torch.optim.SGD([p], lr=0.1), [("p", p)])
    with torch.inference_mode():
        mask = torch.tensor([True, False, True, False])
    p.grad = torch.ones(4)
    wrapper.step(update_mask={"p": mask})
    assert p[1] == 0 and p[3] == 0 and p[0] != 0 and p[2] != 0


def test_an_update_mask_copies_its_masks_and_is_planned_once():
    """An UpdateMask is read once: changing the tensors it was built from does not reach it, and
    the optimizer resolves it once (no per-step reading of its masks)."""
    p = nn.Parameter(torch.zeros(2, 3))
    wrapper = MaskedOptimizer(torch.optim.AdamW([p], lr=0.1, weight_decay=0.1), [("p", p)])
    rows = torch.tensor([[True] * 3, [False] * 3])
    fixed = UpdateMask({"p": rows})
    rows[1] = True  # the caller's tensor changes; the UpdateMask keeps its copy
    for _ in range(3):
        p.grad = torch.ones(2, 3)
        wrapper.step(update_mask=fixed)
    assert torch.equal(p[1], torch.zeros(3)) and bool((p[0] != 0).all())
    assert len(wrapper._plans) == 1 and dict(fixed) == {"p": fixed["p"]} and not fixed["p"][1].any()


@pytest.mark.parametrize("kind", ["adam", "adam_decay", "adamw"])
def test_adam_in_place_equals_the_save_and_restore_path_to_the_bit(kind):
    """Adam's update on the moving coordinates only (the default) and the general path (every
    coordinate stepped, the frozen ones written back) give the same parameters and state, with
    row runs, column runs and unstructured masks that change between steps."""
    gen = torch.Generator().manual_seed(5)
    results = []
    for in_place in (True, False):
        torch.manual_seed(0)
        params = [
            nn.Parameter(torch.randn(6, 5)),
            nn.Parameter(torch.randn(5, 6)),
            nn.Parameter(torch.randn(4, 4)),
        ]
        wrapper = MaskedOptimizer(
            KINDS[kind]([{"params": params}]), [(str(i), p) for i, p in enumerate(params)]
        )
        wrapper.adam_in_place = in_place
        for step in range(4):
            gen.manual_seed(step)
            rows = (torch.rand(6, generator=gen) < 0.5).view(6, 1).expand(6, 5)
            columns = (torch.rand(6, generator=gen) < 0.5).view(1, 6).expand(5, 6)
            scattered = torch.rand(4, 4, generator=gen) < 0.5
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            wrapper.step(update_mask={"0": rows, "1": columns} if step % 2 else {"0": rows, "2": scattered})
        results.append(([p.detach().clone() for p in params], copy.deepcopy(wrapper.state_dict()["state"])))
    (a, a_state), (b, b_state) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for i, state in a_state.items():
        for key, value in state.items():
            assert torch.equal(value, b_state[i][key]), (i, key)
