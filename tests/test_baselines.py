"""The methods reviewers compare with: LoRA, one LoRA per language, lottery-ticket sparse
fine-tuning; what each step updates, to the bit, their resume and their bad settings."""

import copy

import pytest
import torch
from conftest import crash_after_checkpoint, scores, step_on, tiny_config, ud_job

from subnets.config import SettingError
from subnets.methods.language_sft import LanguageDeltas
from subnets.training.runner import Run, run


def set_up(tmp_path, *overrides) -> Run:
    experiment = Run(tiny_config(*overrides), tmp_path)
    experiment.setup()
    return experiment


def test_lora_updates_exactly_its_low_rank_matrices_and_the_task_head(tmp_path):
    experiment = set_up(tmp_path, "+method=lora", "lora.rank=2")
    model = experiment.model
    try:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(3):
            step_on(experiment, experiment.sampler.next_language())
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        lora = {n for n in before if "lora_" in n}
        head = {n for n in before if not n.startswith("encoder.transformer.")}
        # rank 2 on query, key, value and attention output of 2 layers of width 32: A is 2 x 32, B is 32 x 2
        assert len(lora) == 2 * 4 * 2 and all(before[n].numel() == 2 * 32 for n in lora)
        assert changed <= lora | head and {n for n in changed if "lora_B" in n} == {
            n for n in lora if "lora_B" in n
        }
        assert {
            n for n, p in model.named_parameters() if p.requires_grad
        } == lora | head  # the base is frozen
    finally:
        experiment.close()


def test_language_lora_trains_only_the_steps_languages_adapter(tmp_path):
    experiment = set_up(tmp_path, "+method=language_lora", "lora.rank=2")
    model, languages = experiment.model, list(experiment.cfg.languages.train)
    try:
        for lang in [languages[0], languages[1], languages[0]]:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            step_on(experiment, lang)
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # B starts at zero: a step of its language moves it
                    own = f".{lang}." in name
                    assert torch.equal(parameter, before[name]) != own, (lang, name)
                elif "lora_" not in name and name.startswith("encoder.transformer."):
                    assert torch.equal(parameter, before[name]), name  # the frozen base
            assert model.encoder.transformer.active_adapter == lang
    finally:
        experiment.close()


def test_lt_sft_resets_to_pretrained_and_its_sparse_phase_moves_exactly_its_ticket(tmp_path):
    k = 500
    experiment = set_up(tmp_path, "+method=lt_sft", "sft.full_steps=3", f"sft.k={k}")
    model, policy = experiment.model, experiment.method.policy
    try:
        pretrained = {n: p.detach().clone() for n, p in model.encoder_parameters()}
        for _ in range(3):  # the full phase, then the ticket and the reset at its last step
            step_on(experiment, experiment.sampler.next_language())
        ticket = policy.tickets["shared"]
        assert sum(int(m.sum()) for m in ticket.values()) == k
        named = dict(model.named_parameters())
        assert all(torch.equal(named[n], pretrained[n]) for n in pretrained)  # reset to theta_0
        assert not experiment.optimizer.state  # fresh moments for the sparse phase
        # tiny: 12 steps, 2 warm-up steps; the full phase decays to 0 at step 3, then the sparse
        # phase warms up again over its 9 steps: factor 1/2 at its first step
        base = experiment.cfg.train.lr_encoder
        rates = [group["lr"] for group in experiment.optimizer.param_groups if group.get("name") == "encoder"]
        assert rates == [pytest.approx(base / 2)], rates
        for _ in range(4):
            step_on(experiment, experiment.sampler.next_language())
        moved = sum(int((named[n] != pretrained[n]).sum()) for n in pretrained)
        outside = sum(int((named[n][~ticket[n]] != pretrained[n][~ticket[n]]).sum()) for n in pretrained)
        assert outside == 0 and moved == k  # every ticket coordinate moved (AdamW), nothing else
    finally:
        experiment.close()


def test_lt_sft_per_language_tickets_and_resume(tmp_path, monkeypatch):
    overrides = ["+method=lt_sft", "sft.per_language=true", "sft.full_steps=4", "sft.k=300", "train.steps=12",
                 "train.checkpoint_every=4"]  # fmt: skip
    reference = run(tiny_config(*overrides), tmp_path / "reference")
    assert reference["sft"]["tickets"] == sorted(tiny_config().languages.train)
    assert set(reference["parameters"]["updated"].values()) == {reference["parameters"]["updated"]["syn_svo"]}
    head = reference["parameters"]["updated"]["syn_svo"] - 300
    assert reference["parameters"]["trainable"] > head + 300 and head > 0
    crash_after_checkpoint(monkeypatch, tiny_config(*overrides), tmp_path / "resumed", step=8)
    monkeypatch.undo()
    assert scores(run(tiny_config(*overrides), tmp_path / "resumed")) == scores(reference)


def test_a_language_sft_computes_as_the_merged_weights(tmp_path):
    """LanguageDeltas adds phi at the outputs of Linear, Embedding and LayerNorm modules: the
    outputs and the gradients are those of a copy holding theta + phi, and with no language
    active the model is its own to the bit."""
    experiment = set_up(tmp_path, "+method=lt_sft")
    model = experiment.model.double()
    try:
        batch = experiment.batches.next_batch("syn_svo", 8)
        model.eval()
        plain = model(batch).loss
        generator = torch.Generator().manual_seed(0)
        delta, merged = {}, copy.deepcopy(model)
        named = dict(merged.named_parameters())
        chosen = [n for n in named if n.startswith("encoder.transformer.") and
                  any(key in n for key in ("word_embeddings", "query.", "dense.bias", "LayerNorm"))]  # fmt: skip
        for name in chosen:
            indices = torch.randperm(named[name].numel(), generator=generator)[
                : max(1, named[name].numel() // 10)
            ]
            values = torch.randn(len(indices), generator=generator, dtype=torch.float64) * 0.5
            delta[name] = (indices, values)
            with torch.no_grad():
                named[name].view(-1)[indices] += values
        assert {n.rsplit(".", 1)[-1] for n in chosen} == {"weight", "bias"} and len(chosen) > 10
        deltas = LanguageDeltas(model)
        deltas.add("syn_svo", delta)
        deltas.activate("syn_svo")
        composed = model(batch).loss
        expected = merged(batch).loss
        assert not torch.isclose(composed, plain) and torch.isclose(composed, expected, rtol=1e-10)
        composed.backward()
        expected.backward()
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                assert torch.allclose(parameter.grad, named[name].grad, rtol=1e-8, atol=1e-12), name
        deltas.activate(None)
        assert torch.equal(model(batch).loss, plain)
    finally:
        experiment.close()


def test_composable_lt_sft_adds_each_languages_sft_and_trains_one_task_sft(tmp_path, ud_root):
    k, language_k = 700, 400
    overrides = ["+method=lt_sft", "sft.compose=true", "sft.full_steps=4", f"sft.k={k}", f"sft.language_k={language_k}",
                 "sft.language_steps=3", f"sft.language_text={ud_root}", "train.steps=9"]  # fmt: skip
    experiment = Run(ud_job(ud_root, *overrides), tmp_path)
    experiment.setup()
    try:
        model, policy = experiment.model, experiment.method.policy
        pretrained = {n: p.detach().clone() for n, p in model.encoder_parameters()}
        experiment.train()
        languages = policy.languages.deltas
        assert set(languages) == {
            "syn_svo",
            "syn_sov",
            "syn_vso",
            "syn_osv",
            "syn_svo_na",
            "syn_vos",
            "syn_sov_an",
        }
        assert all(sum(len(i) for i, _ in delta.values()) == language_k for delta in languages.values())
        # the model's own weights are the pretrained ones plus the task SFT, on its k coordinates
        ticket, named = policy.tickets["shared"], dict(model.named_parameters())
        assert all(torch.equal(named[n][~ticket[n]], pretrained[n][~ticket[n]]) for n in pretrained)
        batch = experiment.batcher.of(experiment.data.evaluated[("target", "syn_vos")], range(8))
        model.eval()
        policy.eval_gates("syn_vos")
        with_own = model(batch).loss
        policy.languages.activate(None)
        assert not torch.equal(with_own, model(batch).loss)  # zero-shot on syn_vos adds its language SFT
    finally:
        experiment.close()


def test_composable_lt_sft_resumes_exactly(tmp_path, monkeypatch, ud_root):
    overrides = ["+method=lt_sft", "sft.compose=true", "sft.full_steps=4", "sft.k=700", "sft.language_k=400",
                 "sft.language_steps=3", f"sft.language_text={ud_root}", "train.steps=12"]  # fmt: skip
    reference = run(ud_job(ud_root, *overrides), tmp_path / "reference")
    assert (
        set(reference["sft"]["language_sfts"].values()) == {400}
        and len(reference["sft"]["language_sfts"]) == 7
    )
    crash_after_checkpoint(monkeypatch, ud_job(ud_root, *overrides), tmp_path / "resumed", step=8)
    monkeypatch.undo()
    assert scores(run(ud_job(ud_root, *overrides), tmp_path / "resumed")) == scores(reference)


@pytest.mark.parametrize("units, budget", [("heads", 4 * 1048), ("both", 4 * 1048 + 64 * 65)])
def test_budgets_matched_to_a_static_subnetwork(tmp_path, units, budget):
    # tiny: 2 layers x 4 heads of 8 dimensions in width 32, 64 neurons per layer; keep_ratio 0.5
    # keeps 4 heads, each owning 3 x (8 x 32 + 8) q/k/v weights and biases and 32 x 8 of the output
    # projection, and 64 neurons, each owning 32 + 1 input weights and bias and 32 output weights
    masks = ["masks.selection=keep_ratio", f"masks.units={units}"]
    lt_sft = set_up(tmp_path / "sft", "+method=lt_sft", "sft.match=static", "sft.k=7", *masks)
    lora = set_up(tmp_path / "lora", "+method=lora", "lora.match=static", *masks)
    try:
        assert lt_sft.method.policy.k == budget  # sft.k given and overridden by the match
        per_rank = 4 * 2 * (32 + 32)  # A and B of query, key, value, output in 2 layers
        assert lora.method.policy.rank == round(budget / per_rank)
        adapter = sum(p.numel() for n, p in lora.model.named_parameters() if "lora_" in n)
        assert adapter == lora.method.policy.rank * per_rank
        assert abs(adapter - budget) <= per_rank / 2  # the closest rank
    finally:
        lt_sft.close()
        lora.close()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+method=lora", "lora.targets=[attention.self.nowhere]"], "lora.targets: attention.self.nowhere is not a projection"),
        (["+method=lt_sft", "sft.k=100000000"], r"sft.k=100000000 .*expected between 1 and the encoder's \d+ trainable"),
        (["+method=lora", "lora.match=static"], "lora.match / shira.match / sft.match=static\\) needs .* masks.selection=keep_ratio or top_k \\(is iterative\\)"),
        (["+method=lt_sft", "sft.compose=true", "sft.per_language=true"], "sft.compose=true composes .* use sft.per_language=false"),
        (["+method=lt_sft", "sft.compose=true", "sft.language_text=/nowhere"], "sft.language_text=/nowhere: not a folder"),
        (["+method=lt_sft", "sft.compose=true", "train.batches=mixed"], "train.batches=mixed: \\+method=lt_sft"),
        (["+method=language_lora", "train.batches=mixed"], "train.batches=mixed: \\+method=language_lora .* runs one language per step"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_with_the_setting_named(tmp_path, overrides, message):
    with pytest.raises((SettingError, ValueError), match=message):
        run(tiny_config(*overrides, "train.steps=2"), tmp_path)


def test_language_lora_gives_an_unseen_language_the_adapter_its_support_prefers(tmp_path):
    results = run(
        tiny_config("+method=language_lora", "lora.target_policy=support", "train.steps=6"), tmp_path
    )
    sources = set(tiny_config().languages.train)
    assert set(results["target_adapters"]) == {"syn_svo_na", "syn_vos", "syn_sov_an"}
    assert set(results["target_adapters"].values()) <= sources
    full = run(tiny_config("+method=language_lora", "train.steps=6"), tmp_path / "full")
    assert set(full["target_adapters"].values()) == {"none"}
