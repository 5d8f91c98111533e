"""+method=dynamic: importance tracked from training steps, masks that follow the data, learned
gates, exact updates under changing masks, history, determinism and resume."""

import json

import pytest
import torch
from conftest import crash_after_checkpoint, scores, step_on, tiny_config

from subnets.data.dataset import load_language
from subnets.data.discovery import discover_languages
from subnets.data.synthetic import SyntheticLanguage, write_synthetic_treebanks
from subnets.masks.dynamic import HardConcreteGates, ImportanceEMA, reselect
from subnets.masks.importance import unit_importance
from subnets.masks.selection import select_keep_ratio
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet, unit_parameter_masks
from subnets.training.runner import Run, run
from subnets.training.update import training_step

DYNAMIC = ["+method=dynamic", "dynamic.update_every=4"]
FROZEN = ["train.lr_encoder=0", "train.lr_head=0", "train.weight_decay=0", "train.warmup_steps=0"]


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@pytest.fixture
def frozen(tmp_path):
    experiment = Run(tiny_config(*DYNAMIC, *FROZEN), tmp_path)
    experiment.setup()
    no_dropout(experiment.model)
    yield experiment
    experiment.close()


def test_ema_of_a_frozen_model_converges_to_the_static_importance(frozen):
    lang = "syn_svo"
    batches = frozen.batcher.fixed(frozen.data.train[lang], 8, 4, "ema")
    static = unit_importance(frozen.model, batches)
    gaps = {}
    for decay in (0.0, 0.98):
        ema = ImportanceEMA(frozen.model.gates.shape, decay)
        for i in range(200):
            result = training_step(frozen.model, batches[i % 4], frozen.optimizer, track_gates=True)
            ema.update(lang, result.gate_grads[lang])
        gaps[decay] = float((ema.scores(lang) - static).abs().max())
    assert gaps[0.98] < 0.02  # the long average equals the static importance of the same data
    assert gaps[0.0] > 5 * gaps[0.98]  # while the last batch alone does not
    ema = ImportanceEMA(frozen.model.gates.shape, 0.9)
    for _ in range(3):
        ema.update(
            lang, training_step(frozen.model, batches[0], frozen.optimizer, track_gates=True).gate_grads[lang]
        )
    assert torch.allclose(ema.scores(lang), unit_importance(frozen.model, batches[:1]), atol=1e-6)


def test_masks_follow_a_language_whose_typology_changes_mid_run(tmp_path):
    # One batch holds a language's whole (16-sentence) training set, so that with frozen weights
    # its moving average settles exactly on the importance of its current data.
    # seed 2: a model whose head ranking differs between the two data sets (asserted below)
    settings = [
        *DYNAMIC,
        *FROZEN,
        "languages.synthetic.train=16",
        "train.batch_size=16",
        "dynamic.decay=0.5",
        "seed=2",
    ]
    experiment = Run(tiny_config(*settings), tmp_path / "run")
    experiment.setup()
    no_dropout(experiment.model)
    policy, lang = experiment.method.policy, "syn_svo"
    keep = experiment.cfg.masks.keep_ratio

    def expected_mask(data):
        return select_keep_ratio(unit_importance(experiment.model, [experiment.batcher.of(data)]), keep)

    def train(steps):
        for _ in range(steps):
            experiment.train_step()

    train(60)
    before = policy.masks[lang].unit_mask.clone()
    assert torch.equal(before, expected_mask(experiment.data.train[lang]))

    changed = SyntheticLanguage(lang, order="OSV", adjective="after", adposition="post")
    root = write_synthetic_treebanks(tmp_path / "changed", {lang: changed}, {"train": 16}, seed=7)
    new_data = load_language(discover_languages(root)[lang], "train", experiment.task).tokenize(
        experiment.tokenizer
    )
    experiment.data.train[lang] = new_data
    train(120)
    after = policy.masks[lang].unit_mask
    assert torch.equal(after, expected_mask(new_data))
    assert not torch.equal(after, before)  # the new data calls for other heads, and the mask moved
    changes = [h["changed"] for h in policy.history[lang]]
    assert sum(changes[16:]) > 0
    experiment.close()


def test_reselection_rules():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.2, 0.8, 0.3, 1.0]])
    current = torch.tensor([[True, True, True, False], [False, False, False, True]])
    assert reselect(scores, current, "keep_ratio", keep_ratio=0.25).tolist() == [
        [True, False, False, False], [False, False, False, True]]  # fmt: skip
    assert reselect(scores, current, "same_size").sum() == 4  # as many heads as the current mask
    assert reselect(scores, current, "threshold", threshold=0.5).tolist() == [
        [True, False, True, False], [False, True, False, True]]  # fmt: skip
    assert reselect(scores, current, "threshold", threshold=0.95, min_per_layer=1)[0].tolist() == [
        True, False, False, False]  # the layer's best head, by the minimum  # fmt: skip
    assert reselect(scores, current, "top_k", top_k=3).sum() == 3
    with pytest.raises(ValueError, match="unknown selection"):
        reselect(scores, current, "random")


def test_learned_gates_reach_their_target_sparsity(tmp_path):
    settings = [*DYNAMIC, "dynamic.rule=learned", "train.steps=160", "dynamic.update_every=20",
                "masks.keep_ratio=0.5", "dynamic.gate_lr=0.1"]  # fmt: skip
    results = run(tiny_config(*settings), tmp_path)
    history = json.loads((tmp_path / "masks" / "history.json").read_text())
    from subnets.runs.checkpoint import load_checkpoint

    learned = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["method"]["learned"]
    gates = HardConcreteGates(list(history), (2, 4), beta=0.6667)
    gates.load_state_dict(learned)
    for lang in history:
        # the penalty steers the expected share of open gates to the target keep ratio...
        assert float(gates.open_probability(lang).detach().mean()) == pytest.approx(0.5, abs=0.1)
        # ...and the deterministic mask keeps that share (it started with 90% open)
        final = history[lang][-1]
        assert final["sparsity"] == pytest.approx(0.5, abs=0.15)
        assert torch.equal(torch.tensor(final["mask"]).bool(), gates.mask(lang))
    assert set(results["mask_changes"]) == set(history)


def test_hard_concrete_gates():
    gates = HardConcreteGates(["a"], (3, 4), init_keep=0.9)
    assert torch.allclose(gates.open_probability("a"), torch.full((3, 4), 0.9))
    torch.manual_seed(0)
    samples = torch.stack([gates.sample("a") for _ in range(4000)])
    assert samples.min() >= 0 and samples.max() <= 1
    assert float((samples > 0).float().mean()) == pytest.approx(0.9, abs=0.02)  # P(gate != 0)
    assert gates.mask("a").sum() == round(0.9 * 12)  # the expected number of open gates
    with torch.no_grad():
        gates.log_alpha["a"].fill_(-5.0)
        gates.log_alpha["a"][1, 2] = -4.0
    mask = gates.mask("a", min_per_layer=1)
    assert mask.sum(dim=1).tolist() == [1, 1, 1] and mask[1, 2]  # the layer's largest logit
    penalty = gates.sparsity_penalty("a", 0.5)
    penalty.backward()
    assert gates.log_alpha["a"].grad.sum() < 0  # pulls the (nearly closed) gates open


@pytest.mark.parametrize("apply", ["gradient", "both"])
def test_no_update_reaches_a_coordinate_outside_the_mask_of_its_step(tmp_path, apply):
    experiment = Run(tiny_config(*DYNAMIC, "dynamic.update_every=2", f"method.apply={apply}"), tmp_path)
    experiment.setup()
    method, model = experiment.method.policy, experiment.model
    try:
        masks_seen = set()
        for _ in range(16):
            lang = experiment.sampler.next_language()
            mask = method.masks[lang].unit_mask.clone()
            masks_seen.add((lang, tuple(mask.flatten().tolist())))
            owned = unit_parameter_masks(model, mask)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            step_on(experiment, lang)
            for name, m in owned.items():
                assert torch.equal(dict(model.named_parameters())[name][~m], before[name][~m]), name
        assert len(masks_seen) > 4  # the masks did change along the way
    finally:
        experiment.close()


def test_a_reentering_coordinate_continues_from_its_frozen_optimizer_state(tmp_path):
    experiment = Run(tiny_config(*DYNAMIC, "dynamic.update_every=1000"), tmp_path)
    experiment.setup()
    method, model = experiment.method.policy, experiment.model
    lang, name = "syn_svo", "encoder.transformer.encoder.layer.0.attention.self.query.weight"
    parameter = dict(model.named_parameters())[name]
    rows = slice(0, model.gates.head_dim)  # head 0 of layer 0
    try:
        for _ in range(3):  # some history for the head
            step_on(experiment, lang)
        dropped = SubnetworkSet.for_model(model)
        for code, subnetwork in method.masks.items():
            unit_mask = subnetwork.unit_mask.clone()
            unit_mask[0, 0] = code != lang
            dropped[code] = Subnetwork(unit_mask)
        method.set_masks(dropped)
        state = experiment.optimizer.state[parameter]
        frozen = {k: state[k][rows].clone() for k in ("exp_avg", "exp_avg_sq")}
        value = parameter[rows].detach().clone()
        for _ in range(4):
            step_on(experiment, lang)
            assert torch.equal(parameter[rows], value)
            assert all(torch.equal(state[k][rows], frozen[k]) for k in frozen)  # frozen, not decayed
        restored = SubnetworkSet.for_model(model)
        for code, subnetwork in method.masks.items():
            unit_mask = subnetwork.unit_mask.clone()
            unit_mask[0, 0] = True
            restored[code] = Subnetwork(unit_mask)
        method.set_masks(restored)
        step_on(experiment, lang)
        beta1, beta2 = experiment.optimizer.param_groups[0]["betas"]
        grad = parameter.grad[rows]
        assert torch.allclose(state["exp_avg"][rows], beta1 * frozen["exp_avg"] + (1 - beta1) * grad)
        assert torch.allclose(state["exp_avg_sq"][rows], beta2 * frozen["exp_avg_sq"] + (1 - beta2) * grad**2)
    finally:
        experiment.close()


@pytest.mark.parametrize("rule", ["ema", "learned"])
def test_dynamic_runs_are_deterministic_and_resume_to_the_same_masks(tmp_path, monkeypatch, rule):
    settings = [*DYNAMIC, f"dynamic.rule={rule}"]
    reference = run(tiny_config(*settings), tmp_path / "reference")
    again = run(tiny_config(*settings), tmp_path / "again")
    assert scores(again) == scores(reference)

    crash_after_checkpoint(monkeypatch, tiny_config(*settings), tmp_path / "resumed")
    resumed = run(tiny_config(*settings), tmp_path / "resumed")
    assert scores(resumed) == scores(reference)
    history = [
        json.loads((tmp_path / r / "masks" / "history.json").read_text()) for r in ("reference", "resumed")
    ]
    assert history[0] == history[1]
    final = [
        SubnetworkSet.load(tmp_path / r / "masks" / "masks.safetensors") for r in ("reference", "resumed")
    ]
    assert all(torch.equal(final[0][k].unit_mask, final[1][k].unit_mask) for k in final[0])


def test_dynamic_run_writes_history_and_figures(tmp_path):
    results = run(tiny_config(*DYNAMIC), tmp_path)
    folder = tmp_path / "masks"
    for name in ("history.json", "history.png", "overlap.png", "masks.safetensors", "summary.json"):
        assert (folder / name).stat().st_size > 0, name
    history = json.loads((folder / "history.json").read_text())
    assert set(history) == {"syn_svo", "syn_sov", "syn_vso", "syn_osv"}
    for entries in history.values():
        assert [h["step"] for h in entries] == [0, 4, 8, 12]
        masks = [torch.tensor(h["mask"]) for h in entries]
        assert [h["changed"] for h in entries[1:]] == [int((a != b).sum()) for a, b in zip(masks, masks[1:])]
        assert entries[-1]["sparsity"] == pytest.approx(0.5)
    assert results["mask_changes"] == {lang: sum(h["changed"] for h in e) for lang, e in history.items()}


def test_debug_tiny_updates_dynamic_masks_and_an_interval_past_the_last_step_is_warned_of(tmp_path, caplog):
    results = run(tiny_config("+method=dynamic"), tmp_path / "tiny")  # debug=tiny: 12 steps
    assert sum(results["mask_changes"].values()) > 0
    assert "never updated" not in caplog.text
    Run(tiny_config("+method=dynamic", "dynamic.update_every=12"), tmp_path / "late").setup()
    assert "dynamic.update_every=12 with train.steps=12: the masks are never updated" in caplog.text
