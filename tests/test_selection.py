"""Selection rules (top-k, keep ratio, pruning, iterative pruning, parameter masks) against hand computations."""

import pytest
import torch

from subnets.masks.selection import (
    iterative_pruning,
    prune_lowest,
    select_keep_ratio,
    select_parameters,
    select_top_k,
)

# Layer 2's heads all score below every head of layers 0 and 1.
SCORES = torch.tensor(
    [
        [0.90, 0.10, 0.50, 0.30],
        [0.80, 0.70, 0.20, 0.60],
        [0.05, 0.02, 0.04, 0.03],
    ]
)
# Global order, best first: (0,0) (1,0) (1,1) (1,3) (0,2) (0,3) (1,2) (0,1) (2,0) (2,2) (2,3) (2,1)


def mask_of(*kept, shape=(3, 4)):
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, head in kept:
        mask[layer, head] = True
    return mask


def kept(mask):
    return {tuple(i) for i in mask.nonzero().tolist()}


# select_top_k -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,min_per_layer,expected",
    [
        (3, 1, {(0, 0), (1, 0), (2, 0)}),
        (4, 1, {(0, 0), (1, 0), (2, 0), (1, 1)}),
        (5, 1, {(0, 0), (1, 0), (2, 0), (1, 1), (1, 3)}),
        (7, 1, {(0, 0), (1, 0), (2, 0), (1, 1), (1, 3), (0, 2), (0, 3)}),
        (6, 2, {(0, 0), (0, 2), (1, 0), (1, 1), (2, 0), (2, 2)}),
        (7, 2, {(0, 0), (0, 2), (1, 0), (1, 1), (2, 0), (2, 2), (1, 3)}),
        (3, 0, {(0, 0), (1, 0), (1, 1)}),
        (0, 0, set()),
    ],
)
def test_select_top_k_by_hand(k, min_per_layer, expected):
    mask = select_top_k(SCORES, k, min_per_layer)
    assert mask.dtype == torch.bool and mask.shape == (3, 4)
    assert kept(mask) == expected
    assert int(mask.sum()) == k


def test_select_top_k_keeps_all_heads_at_k_max():
    assert select_top_k(SCORES, 12).all()


def test_select_top_k_keeps_min_per_layer_in_lowest_layer():
    for k in range(3, 9):  # the 8 best heads overall are all in layers 0 and 1
        mask = select_top_k(SCORES, k, min_per_layer=1)
        assert int(mask[2].sum()) == 1 and bool(mask[2, 0])
    for k in range(6, 10):
        mask = select_top_k(SCORES, k, min_per_layer=2)
        assert kept(mask) & {(2, h) for h in range(4)} == {(2, 0), (2, 2)}
        assert (mask.sum(dim=1) >= 2).all()


@pytest.mark.parametrize("k,min_per_layer", [(2, 1), (13, 1), (5, 2), (-1, 0), (13, 0), (12, 5)])
def test_select_top_k_rejects_k_out_of_range(k, min_per_layer):
    with pytest.raises(ValueError, match=f"k={k}"):
        select_top_k(SCORES, k, min_per_layer)


def test_select_top_k_breaks_ties_by_position():
    equal = torch.zeros(3, 4)
    mask = select_top_k(equal, 5, min_per_layer=1)
    # The first head of each layer, then the earliest of the rest.
    assert kept(mask) == {(0, 0), (1, 0), (2, 0), (0, 1), (0, 2)}
    assert torch.equal(select_top_k(equal, 5, min_per_layer=1), mask)
    partly = torch.tensor([[0.0, 1.0, 1.0, 0.5], [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # Layer best: (0,1), (1,0), (2,0); then the 1.0s in position order: (0,2), (1,2), (1,3).
    assert kept(select_top_k(partly, 5, 1)) == {(0, 1), (1, 0), (2, 0), (0, 2), (1, 2)}
    assert kept(select_top_k(partly, 6, 1)) == {(0, 1), (1, 0), (2, 0), (0, 2), (1, 2), (1, 3)}
    assert kept(select_top_k(partly, 3, 0)) == {(0, 1), (0, 2), (1, 0)}


# select_keep_ratio --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio,min_per_layer,k",
    [
        (0.5, 1, 6),  # round(6.0)
        (0.3, 1, 4),  # round(3.6)
        (0.4, 1, 5),  # round(4.8)
        (0.1, 1, 3),  # round(1.2) = 1 < 3 x 1
        (0.25, 2, 6),  # round(3.0) = 3 < 3 x 2
        (0.6, 2, 7),  # round(7.2)
        (1.0, 1, 12),
    ],
)
def test_select_keep_ratio_k_by_hand(ratio, min_per_layer, k):
    mask = select_keep_ratio(SCORES, ratio, min_per_layer)
    assert int(mask.sum()) == k
    assert torch.equal(mask, select_top_k(SCORES, k, min_per_layer))


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.01, 2.0])
def test_select_keep_ratio_rejects_invalid_ratio(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        select_keep_ratio(SCORES, ratio)


# prune_lowest -------------------------------------------------------------------------------------


def test_prune_lowest_removes_ceil_fraction_of_lowest():
    full = torch.ones(3, 4, dtype=torch.bool)
    # ceil(0.25 x 12) = 3: the three lowest, all in layer 2.
    assert kept(full) - kept(prune_lowest(SCORES, full, 0.25)) == {(2, 1), (2, 3), (2, 2)}
    # ceil(0.4 x 12) = 5: (2,0) is the last of layer 2 and stays; then (0,1) and (1,2).
    pruned = prune_lowest(SCORES, full, 0.4)
    assert kept(full) - kept(pruned) == {(2, 1), (2, 3), (2, 2), (0, 1), (1, 2)}
    assert full.all()  # the input is not modified


def test_prune_lowest_removes_at_least_one():
    full = torch.ones(3, 4, dtype=torch.bool)
    assert kept(full) - kept(prune_lowest(SCORES, full, 0.01)) == {(2, 1)}
    assert kept(full) - kept(prune_lowest(SCORES, full, 0.0)) == {(2, 1)}


def test_prune_lowest_counts_only_remaining_heads():
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1] = mask[2, 3] = False  # the two lowest heads are already gone; 10 remain
    pruned = prune_lowest(SCORES, mask, 0.2)
    # ceil(0.2 x 10) = 2 (not ceil(0.2 x 12) = 3): (2,2), then (2,0) is protected, then (0,1).
    assert kept(mask) - kept(pruned) == {(2, 2), (0, 1)}
    assert kept(pruned) <= kept(mask)  # nothing comes back
    assert int(pruned.sum()) == 8


def test_prune_lowest_never_goes_below_min_per_layer():
    full = torch.ones(3, 4, dtype=torch.bool)
    pruned = prune_lowest(SCORES, full, 1.0, min_per_layer=2)
    assert kept(pruned) == {(0, 0), (0, 2), (1, 0), (1, 1), (2, 0), (2, 2)}
    minimal = mask_of((0, 0), (1, 0), (2, 0))
    assert torch.equal(prune_lowest(SCORES, minimal, 0.5, min_per_layer=1), minimal)


def test_prune_lowest_breaks_ties_by_position():
    equal = torch.zeros(3, 4)
    full = torch.ones(3, 4, dtype=torch.bool)
    # Among equals the later head goes first (the earlier one wins).
    assert kept(full) - kept(prune_lowest(equal, full, 0.25)) == {(2, 3), (2, 2), (2, 1)}


# iterative_pruning --------------------------------------------------------------------------------


class Recorder:
    """Wraps a function of a mask and records (a copy of) every mask it is called with."""

    def __init__(self, function):
        self.function, self.masks = function, []

    def __call__(self, mask):
        self.masks.append(mask.clone())
        return self.function(mask)


def heads_kept(mask):
    return float(mask.sum())


def test_iterative_pruning_stops_below_threshold():
    score = Recorder(lambda mask: SCORES.clone())
    metric = Recorder(heads_kept)
    result = iterative_pruning(score, metric, (3, 4), fraction=0.25, threshold=0.5)
    # 12 -> 9 (ceil 3: layer 2 but (2,0)) -> 6 (ceil 2.25 = 3: (0,1), (1,2), (0,3); 6 >= 0.5 x 12)
    # -> 4 (ceil 1.5 = 2: (0,2), (1,3); 4 < 6: stop, keep the 6-head mask).
    assert result.baseline == 12.0
    assert result.history == [(12, 12.0), (9, 9.0), (6, 6.0), (4, 4.0)]
    assert kept(result.mask) == {(0, 0), (0, 2), (1, 0), (1, 1), (1, 3), (2, 0)}
    assert "4" in result.stopped_by and "0.5" in result.stopped_by and "<" in result.stopped_by
    assert [int(m.sum()) for m in metric.masks] == [12, 9, 6, 4]
    assert [int(m.sum()) for m in score.masks] == [12, 9, 6]


def test_iterative_pruning_with_metric_table():
    table = {12: 0.80, 9: 0.78, 6: 0.73, 4: 0.70, 3: 0.69}

    def metric(mask):
        return table[int(mask.sum())]

    result = iterative_pruning(lambda m: SCORES, metric, (3, 4), fraction=0.25, threshold=0.9)
    # 0.9 x 0.80 = 0.72: 0.78 and 0.73 stay above, 0.70 falls below.
    assert result.history == [(12, 0.80), (9, 0.78), (6, 0.73), (4, 0.70)]
    assert int(result.mask.sum()) == 6
    assert "0.7" in result.stopped_by

    first = iterative_pruning(lambda m: SCORES, metric, (3, 4), fraction=0.25, threshold=0.99)
    # 0.99 x 0.80 = 0.792 > 0.78: the first pruned round already fails.
    assert first.history == [(12, 0.80), (9, 0.78)]
    assert first.mask.all()


def test_iterative_pruning_rescoring_uses_current_mask():
    bonus = 0.01 * torch.arange(1, 13, dtype=torch.float32).view(3, 4)

    def fullest_layer_first(mask):
        # Heads of fuller layers score lower; without re-scoring, layer 0 would be emptied first.
        return -mask.sum(dim=1, keepdim=True).float() + bonus

    score = Recorder(fullest_layer_first)
    result = iterative_pruning(score, heads_kept, (3, 4), fraction=0.01, threshold=0.0, max_rounds=4)
    removed = [(0, 0), (1, 0), (2, 0), (0, 1)]
    expected = [torch.ones(3, 4, dtype=torch.bool)]
    for layer, head in removed:
        expected.append(expected[-1].clone())
        expected[-1][layer, head] = False
    assert len(score.masks) == 4
    for called, mask in zip(score.masks, expected[:4]):
        assert torch.equal(called, mask)
    assert torch.equal(result.mask, expected[4])
    assert result.history == [(12, 12.0), (11, 11.0), (10, 10.0), (9, 9.0), (8, 8.0)]
    assert result.stopped_by == "max_rounds=4"


def test_iterative_pruning_stops_at_min_per_layer():
    metric = Recorder(lambda mask: 1.0)  # never falls
    result = iterative_pruning(lambda m: SCORES, metric, (3, 4), fraction=0.5, threshold=0.9)
    # 12 -> 6 ((2,1),(2,3),(2,2),(0,1),(1,2),(0,3)) -> 3 ((0,2),(1,3),(1,1)) -> nothing left to remove.
    assert result.history == [(12, 1.0), (6, 1.0), (3, 1.0)]
    assert kept(result.mask) == {(0, 0), (1, 0), (2, 0)}
    assert "minimum" in result.stopped_by
    assert len(metric.masks) == 3  # the unchanged candidate is not evaluated

    two = iterative_pruning(lambda m: SCORES, lambda m: 1.0, (3, 4), fraction=0.5, min_per_layer=2)
    assert kept(two.mask) == {(0, 0), (0, 2), (1, 0), (1, 1), (2, 0), (2, 2)}
    assert "minimum" in two.stopped_by


def test_iterative_pruning_max_rounds():
    result = iterative_pruning(
        lambda m: SCORES, heads_kept, (3, 4), fraction=0.25, threshold=0.1, max_rounds=2
    )
    assert result.history == [(12, 12.0), (9, 9.0), (6, 6.0)]
    assert int(result.mask.sum()) == 6
    assert result.stopped_by == "max_rounds=2"
    none = iterative_pruning(lambda m: SCORES, heads_kept, (3, 4), max_rounds=0)
    assert none.mask.all() and none.history == [(12, 12.0)] and none.stopped_by == "max_rounds=0"


# select_parameters --------------------------------------------------------------------------------


def parameter_scores():
    return {
        "a": torch.tensor([[60.0, 50.0, 40.0], [30.0, 20.0, 10.0]]),  # all the largest values
        "b": torch.tensor([4.0, 1.0, 3.0, 2.0]),
    }


def test_select_parameters_per_tensor():
    masks = select_parameters(parameter_scores(), 0.5, scope="tensor")
    # a: round(0.5 x 6) = 3; b: round(0.5 x 4) = 2.
    assert masks["a"].tolist() == [[True, True, True], [False, False, False]]
    assert masks["b"].tolist() == [True, False, True, False]
    assert masks["a"].dtype == torch.bool and masks["b"].dtype == torch.bool
    small = select_parameters(parameter_scores(), 0.1)  # the default scope is per tensor
    # a: round(0.6) = 1; b: round(0.4) = 0, at least 1.
    assert small["a"].tolist() == [[True, False, False], [False, False, False]]
    assert small["b"].tolist() == [True, False, False, False]
    everything = select_parameters(parameter_scores(), 1.0, scope="tensor")
    assert everything["a"].all() and everything["b"].all()


def test_select_parameters_global():
    masks = select_parameters(parameter_scores(), 0.5, scope="global")
    # round(0.5 x 10) = 5 largest of all: 60, 50, 40, 30, 20, all in a.
    assert masks["a"].tolist() == [[True, True, True], [True, True, False]]
    assert masks["b"].tolist() == [False, False, False, False]
    assert masks["a"].shape == (2, 3) and masks["b"].shape == (4,)
    assert masks["a"].dtype == torch.bool
    seven = select_parameters(parameter_scores(), 0.7, scope="global")
    assert int(seven["a"].sum()) == 6 and seven["b"].tolist() == [True, False, False, False]


def test_select_parameters_global_ties_by_position():
    scores = {"x": torch.ones(2), "y": torch.ones(2)}
    masks = select_parameters(scores, 0.5, scope="global")
    assert masks["x"].tolist() == [True, True] and masks["y"].tolist() == [False, False]


@pytest.mark.parametrize("ratio", [0.0, -1.0, 1.5])
def test_select_parameters_rejects_invalid_ratio(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        select_parameters(parameter_scores(), ratio)


def test_select_parameters_rejects_invalid_scope():
    with pytest.raises(ValueError, match="scope"):
        select_parameters(parameter_scores(), 0.5, scope="layer")
