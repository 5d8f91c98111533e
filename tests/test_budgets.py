"""Matched budgets: every method sized to a static subnetwork (``lora.match``, ``shira.match``,
``sft.match=static``) trains as many parameters per language as the subnetwork does, counted from
the built model and its policy (results.json's ``parameters``), not from the formula; with
``masks.train=subnetwork`` the budget is the subnetwork-only one (weights, no biases)."""

import pytest
from conftest import step_on, tiny_config
from test_shared import E5_PATH, needs_e5

from subnets.config import SettingError
from subnets.methods.subnetworks import subnetwork_budget
from subnets.training.runner import Run, run

SEARCH = [
    "masks.selection=keep_ratio",
    "masks.finetune_steps=0",
    "masks.importance_batches=1",
    "masks.batch_size=4",
]
METHODS = {
    "static": ["+method=static"],
    "random": ["+method=random"],
    "lora": ["+method=lora", "lora.match=static"],
    "shira": ["+method=shira", "shira.match=static"],
    "lt_sft": ["+method=lt_sft", "sft.match=static", "sft.full_steps=1"],
    # LAPE's language neurons (subnets.masks.activation): neurons only
    "activation": ["+method=static", "masks.importance=activation"],
}
ALL = ("static", "random", "lora", "shira", "lt_sft")  # and "activation" where the units are neurons


def language_budgets(cfg, folder) -> tuple[dict[str, int], Run]:
    """What each training language's steps may update, task head aside (the parameters outside
    the transformer: the head and the scalar mix, the same for every method), from the set-up
    run's policy; LT-SFT after its one full step, once its ticket is chosen."""
    experiment = Run(cfg, folder)
    experiment.setup()
    model, policy = experiment.model, experiment.method.policy
    if cfg.method.name == "lt_sft":
        step_on(experiment, experiment.sampler.next_language())
    head = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("encoder.transformer."))  # fmt: skip
    budget = policy.parameter_budget(model, list(cfg.languages.train))
    return {lang: n - head for lang, n in budget["updated"].items()}, experiment


def measured(overrides, tmp_path, methods=ALL) -> dict[str, dict[str, int]]:
    """Each of ``methods``' per-language budgets under the same ``overrides``, with LoRA's and
    SHiRA's parameters per rank (``lora_per_rank``, ``shira_per_rank``, from their adapters) and
    [subnetwork_budget][subnets.methods.subnetworks.subnetwork_budget] (``formula``)."""
    out = {}
    for name in methods:
        budgets, experiment = language_budgets(tiny_config(*METHODS[name], *overrides), tmp_path / name)
        if name in ("lora", "shira"):  # the adapter's size per unit of rank, from the built adapter
            size = sum(p.numel() for n, p in experiment.model.named_parameters() if f"{name}_" in n)
            out[f"{name}_per_rank"] = size / experiment.method.policy.rank
        if "formula" not in out:
            out["formula"] = subnetwork_budget(experiment.model, experiment.cfg.masks)
        experiment.close()
        out[name] = budgets
    return out


def check_matched(found, tolerance_ranks=0.5) -> None:
    """Static and random subnetworks (and activation-selected ones, where measured) update the
    same count in every language; LoRA's and SHiRA's adapters are within half a rank's parameters
    of it (their sizes are whole multiples of ``per_rank``: the closest is at most half of one
    away); LT-SFT's ticket is exactly it."""
    subnetwork = set(found["static"].values())
    assert len(subnetwork) == 1, found["static"]
    budget = subnetwork.pop()
    assert budget == found["formula"]
    assert set(found["random"].values()) == {budget}
    assert set(found["lt_sft"].values()) == {budget}
    if "activation" in found:
        assert set(found["activation"].values()) == {budget}
    for adapter in ("lora", "shira"):
        (size,) = set(found[adapter].values())  # one adapter for every language
        assert abs(size - budget) <= tolerance_ranks * found[f"{adapter}_per_rank"], (adapter, size, budget)


@pytest.mark.parametrize(
    "train, units, budget",
    [  # tiny: 2 layers of 4 heads (8 wide) in width 32, 64 neurons per layer; keep_ratio 0.5
        ("subnetwork", "heads", 4 * (3 * 8 * 32 + 32 * 8)),  # 4 heads' q/k/v rows and output columns
        ("subnetwork", "neurons", 64 * (32 + 32)),  # 64 neurons' input rows and output columns
        ("subnetwork", "both", 4 * 1024 + 64 * 64),
        ("all", "heads", 4 * (3 * (8 * 32 + 8) + 32 * 8)),  # and their q/k/v biases
        ("all", "both", 4 * 1048 + 64 * (32 + 1 + 32)),
    ],
)
def test_every_method_matched_to_a_static_subnetwork_updates_its_budget_on_the_tiny_model(
    tmp_path, train, units, budget
):
    overrides = [*SEARCH, f"masks.units={units}", f"masks.train={train}"]
    if train == "subnetwork":  # LoRA and SHiRA sizes are multiples of 2 x 4 x (32 + 32) = 512: exact here
        found = measured(overrides, tmp_path, ALL + (("activation",) if units == "neurons" else ()))
        assert found["formula"] == budget
        check_matched(found, tolerance_ranks=0)
    else:  # train=all: a static subnetwork also updates the shared parameters; compare the formula
        found = measured(overrides, tmp_path, ("lora", "shira", "lt_sft"))
        assert found["formula"] == budget and set(found["lt_sft"].values()) == {budget}
        for adapter in ("lora", "shira"):
            (size,) = set(found[adapter].values())
            assert abs(size - budget) <= found[f"{adapter}_per_rank"] / 2


def test_shira_static_match_refuses_a_budget_its_targets_cannot_hold(tmp_path):
    # 3 of 4 heads and 96 of 128 neurons: 6 x 1024 + 96 x 64 = 12288 weights, r = 12288 / 512 = 24;
    # a 32 x 32 projection holds at most r = 16 (r x (32 + 32) <= 32 x 32)
    overrides = [
        *SEARCH,
        "masks.units=both",
        "masks.keep_ratio=0.75",
        "masks.train=subnetwork",
        "train.steps=2",
    ]
    with pytest.raises(
        SettingError, match=r"shira.r=24 \(matched to a static subnetwork's 12288\).* r <= 16"
    ):
        run(tiny_config("+method=shira", "shira.match=static", *overrides), tmp_path)


@pytest.mark.slow
@pytest.mark.shared
@needs_e5
@pytest.mark.parametrize("units", ["heads", "neurons", "both"])
def test_every_method_trains_the_subnetwork_only_budget_on_e5_small(tmp_path, units):
    """multilingual-e5-small (12 layers x 12 heads of 32 in width 384, 1536 neurons), a quarter of
    the units kept (3 heads, 384 neurons per layer), trained alone: each head owns 4 x 32 x 384 =
    49,152 weights and each neuron 2 x 384 = 768, so the budget is 1,769,472 (heads), 3,538,944
    (neurons) or 5,308,416 (both). LoRA and SHiRA on the attention projections add 48 x 768 =
    36,864 parameters per rank: r 48, 96 and 144 match exactly (measured: every method at the
    budget, to the parameter). The tolerance is half a rank's parameters, the rounding of an
    integer rank; LT-SFT's ticket (after its 1-step full phase) is k, the budget, exactly; with
    neurons, LAPE's activation-selected subnetworks (masks.importance=activation) too."""
    e5 = ["model=e5_small", f"model.name_or_path={E5_PATH}", "masks.keep_ratio=0.25"]
    methods = ALL + (("activation",) if units == "neurons" else ())  # LAPE scores neurons only
    found = measured([*e5, *SEARCH, f"masks.units={units}", "masks.train=subnetwork"], tmp_path, methods)
    expected = {"heads": 1_769_472, "neurons": 3_538_944, "both": 5_308_416}[units]
    assert found["lora_per_rank"] == found["shira_per_rank"] == 36_864 and found["formula"] == expected
    check_matched(found)
