"""subnets.hf: subnetworks on a Hugging Face model, the Trainer, sharing, per-example gates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch
import transformers
from helpers import tagging_languages, tiny_tagger
from torch import nn

from subnets.hf import (
    LanguageGroupedSampler,
    SubnetworkConfig,
    SubnetworkModel,
    SubnetworkTrainer,
    find_subnetworks,
    with_subnetworks,
)
from subnets.masks import MaskMismatchError, unit_importance, unit_parameter_masks
from subnets.masks.selection import select_keep_ratio
from subnets.models.layouts import UnknownLayoutError


@pytest.fixture(scope="module")
def languages():
    return tagging_languages(64)


def training_args(folder, **overrides) -> transformers.TrainingArguments:
    settings = dict(output_dir=str(folder), max_steps=40, per_device_train_batch_size=16, learning_rate=3e-3,
                    weight_decay=0.1, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, seed=3,
                    disable_tqdm=True)  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **overrides})


def test_language_gates_each_example_as_its_own_batch(languages):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="both", apply="both"))
    find_subnetworks(model, languages)
    model.eval()
    de, fr = languages["de"][:3], languages["fr"][:2]
    batch = lambda part: {k: torch.tensor(part[k]) for k in ("input_ids", "attention_mask")}  # noqa: E731
    with torch.no_grad():
        with model.language("de"):
            alone_de = model(**batch(de)).logits
        assert model.active_language is None
        alone_fr = model(**batch(fr), language="fr").logits
        full = model(**batch(de)).logits  # no language: the whole model
        mixed_inputs = {k: torch.cat([batch(de)[k], batch(fr)[k]]) for k in ("input_ids", "attention_mask")}
        mixed = model(**mixed_inputs, language=["de"] * 3 + ["fr"] * 2).logits
    torch.testing.assert_close(mixed, torch.cat([alone_de, alone_fr]), rtol=0, atol=1e-6)
    assert not torch.allclose(alone_de, full)  # the mask changes the output
    with torch.no_grad(), model.gates.applied(model.masks["de"].unit_mask.float()):
        direct = model.model(**batch(de)).logits
    torch.testing.assert_close(alone_de, direct, rtol=0, atol=0)


def test_mixed_batch_gradient_is_the_sum_of_its_languages_gradients(languages):
    """A mixed batch with per-example gates gives the gradient of the per-language sub-batches summed."""
    model = with_subnetworks(
        tiny_tagger(dtype=torch.float64), SubnetworkConfig(units="both", keep_ratio=0.4, apply="both")
    )
    find_subnetworks(model, {code: data.select(range(16)) for code, data in languages.items()})
    model.eval()  # no dropout: the same function of each example both ways
    codes = ["de", "fr", "fr", "de", "fr"]
    rows = {"de": iter(range(10)), "fr": iter(range(10))}
    examples = [languages[c][next(rows[c])] for c in codes]
    tensor = lambda key, idx: torch.tensor([examples[i][key] for i in idx])  # noqa: E731

    def gradients(indices: list[int]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tensor("input_ids", indices), attention_mask=tensor("attention_mask", indices),
                    language=[codes[i] for i in indices])  # fmt: skip
        loss = nn.functional.cross_entropy(
            out.logits.flatten(0, 1), tensor("labels", indices).flatten(), reduction="sum"
        )
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed = gradients(list(range(5)))
    de = gradients([i for i, c in enumerate(codes) if c == "de"])
    fr = gradients([i for i, c in enumerate(codes) if c == "fr"])
    for name, grad in mixed.items():
        torch.testing.assert_close(grad, de[name] + fr[name], rtol=1e-10, atol=1e-12, msg=name)
    # an example's gradient reaches only its language's heads: a query row of a head neither keeps is zero
    union = model.masks["de"].unit_mask | model.masks["fr"].unit_mask
    kept = unit_parameter_masks(model, union)
    name = "model.bert.encoder.layer.0.attention.self.query.weight"
    assert not kept[name].all() and mixed[name][~kept[name]].abs().max() == 0
    assert mixed[name][kept[name]].abs().max() > 0


def test_find_subnetworks_scores_with_the_models_own_loss(languages):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads", keep_ratio=0.5))
    found = find_subnetworks(model, {"de": languages["de"]}, batch_size=16)
    batches = [{k: torch.tensor(languages["de"][i : i + 16][k]) for k in ("input_ids", "attention_mask", "labels")}
               for i in range(0, 64, 16)]  # fmt: skip
    expected = unit_importance(model.model, batches, lambda b: model.model(**b).loss, gates=model.gates)
    torch.testing.assert_close(found["de"].scores, expected)
    assert torch.equal(found["de"].unit_mask, select_keep_ratio(expected, 0.5, 1))
    assert found["de"].unit_mask.sum() == 4 and found["de"].unit_mask.sum(dim=1).min() >= 1
    random = with_subnetworks(
        tiny_tagger(), SubnetworkConfig(units="neurons", rule="random", keep_ratio=0.25, seed=5)
    )
    drawn = find_subnetworks(random, {"de": languages["de"], "fr": languages["fr"]})
    assert drawn["de"].unit_mask.sum(dim=1).tolist() == [16, 16]
    assert not torch.equal(drawn["de"].unit_mask, drawn["fr"].unit_mask)
    again = find_subnetworks(
        with_subnetworks(tiny_tagger(seed=1), random.subnetwork_config), {"de": languages["de"]}
    )
    assert torch.equal(again["de"].unit_mask, drawn["de"].unit_mask)  # the seed and the language decide


def test_a_subnetwork_set_saved_by_one_process_loads_in_another_with_identical_outputs(tmp_path, languages):
    tiny_tagger().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "base")
    model = with_subnetworks(base, SubnetworkConfig(units="both", keep_ratio=0.5, apply="both"))
    find_subnetworks(model, languages)
    model.save_pretrained(tmp_path / "set", made_by="find_subnetworks(model, {'de': ..., 'fr': ...})")
    inputs = torch.tensor(languages["fr"][:4]["input_ids"])
    model.eval()
    with torch.no_grad(), model.language("fr"):
        expected = model(input_ids=inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch, transformers
        from subnets.hf import SubnetworkModel
        base = transformers.AutoModelForTokenClassification.from_pretrained({str(tmp_path / "base")!r})
        model = SubnetworkModel.from_pretrained(base, {str(tmp_path / "set")!r}).eval()
        with torch.no_grad(), model.language("fr"):
            torch.save(model(input_ids=torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", **_environment()})
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    config = json.loads((tmp_path / "set" / "config.json").read_text())
    assert config["languages"] == ["de", "fr"] and config["units"] == {"heads": 4, "neurons": 64}
    assert (
        config["base_model"]["name"] == str(tmp_path / "base")
        and config["base_model"]["model_type"] == "bert"
    )
    assert config["config"]["keep_ratio"] == 0.5
    card = (tmp_path / "set" / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: subnets" in header and "- de" in header and "- fr" in header
    assert "| fr | 68 of 136 | 0.500 |" in card and "find_subnetworks(model" in card
    with pytest.raises(
        MaskMismatchError,
        match=r"made for .*base with \(layers, heads, neurons\) = \(2, 4, 64\); this model \(BertForTokenClassification\) has \(layers, heads, neurons\) = \(3, 4, 64\)",
    ):
        SubnetworkModel.from_pretrained(tiny_tagger(layers=3), str(tmp_path / "set"))


def _environment() -> dict:
    import os

    return dict(os.environ)


def test_trainer_updates_only_the_languages_units_and_learns(tmp_path, languages):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="both", keep_ratio=0.3, apply="both"))
    find_subnetworks(model, languages)
    union = model.masks["de"].unit_mask | model.masks["fr"].unit_mask
    frozen = {n: ~m for n, m in unit_parameter_masks(model, union).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mixed = datasets.concatenate_datasets(list(languages.values())).shuffle(seed=0)
    trainer = SubnetworkTrainer(model, training_args(tmp_path, max_steps=60), train_dataset=mixed,
                                data_collator=transformers.default_data_collator)  # fmt: skip
    trainer.train()
    named = dict(model.named_parameters())
    for name, outside in frozen.items():
        assert outside.any() and torch.equal(named[name][outside], before[name][outside]), name  # bit for bit
        assert not torch.equal(named[name][~outside], before[name][~outside]), name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.6 * losses[0]
    logged = trainer.state.log_history[0]
    assert logged["subnetworks/sparsity/de"] == pytest.approx(model.masks["de"].sparsity())
    assert 0 < logged["subnetworks/overlap"] < 1


class Crash(transformers.TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError(f"crash at step {self.at_step}")


def test_trainer_resume_gives_the_uninterrupted_runs_masks_and_weights(tmp_path, languages):
    config = SubnetworkConfig(units="heads", rule="dynamic", keep_ratio=0.5, update_every=3, ema_decay=0.5)
    mixed = datasets.concatenate_datasets(list(languages.values())).shuffle(seed=1)

    def trainer(folder, steps):
        model = with_subnetworks(tiny_tagger(seed=2), config)
        args = training_args(folder, max_steps=steps, save_strategy="steps", save_steps=4)
        return SubnetworkTrainer(
            model, args, train_dataset=mixed, data_collator=transformers.default_data_collator
        )

    whole = trainer(tmp_path / "whole", 10)
    whole.train()
    interrupted = trainer(tmp_path / "cut", 10)
    interrupted.add_callback(Crash(at_step=6))  # dies after the checkpoint of step 4
    with pytest.raises(RuntimeError, match="crash at step 6"):
        interrupted.train()
    resumed = trainer(tmp_path / "cut", 10)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    assert whole.model.steps == resumed.model.steps == 10 and set(whole.model.masks) == {"de", "fr"}
    for code in ("de", "fr"):
        assert torch.equal(whole.model.masks[code].unit_mask, resumed.model.masks[code].unit_mask)
        torch.testing.assert_close(
            whole.model.ema.averages[code], resumed.model.ema.averages[code], rtol=0, atol=0
        )
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_language_grouped_sampler_draws_one_language_per_batch(languages):
    codes = ["de"] * 40 + ["fr"] * 24
    sampler = LanguageGroupedSampler(codes, batch_size=8, alpha=0.5, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 64
    batches = [order[i : i + 8] for i in range(0, 64, 8)]
    assert all(len({codes[i] for i in batch}) == 1 for batch in batches)
    assert all(len(set(batch)) == 8 for batch in batches)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match=r"too few examples in \{'fr': 24\}"):
        LanguageGroupedSampler(codes, batch_size=32)


def test_trainer_with_language_grouped_batches_sees_one_language_per_batch(tmp_path, languages):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads", apply="both"))
    find_subnetworks(model, languages)
    batches = []
    model.model.register_forward_pre_hook(lambda module, args: batches.append(model.gates.values))
    mixed = datasets.concatenate_datasets(list(languages.values())).shuffle(seed=0)
    trainer = SubnetworkTrainer(model, training_args(tmp_path, max_steps=8), train_dataset=mixed,
                                data_collator=transformers.default_data_collator, languages_per_batch="one")  # fmt: skip
    trainer.train()
    # one language per batch: its [layers, heads] gates, never per-example rows; both languages drawn
    assert len(batches) == 8 and all(gates.ndim == 2 for gates in batches)
    drawn = {
        code
        for gates in batches
        for code in ("de", "fr")
        if torch.equal(gates.bool(), model.masks[code].unit_mask)
    }
    assert drawn == {"de", "fr"}


def test_a_float16_model_on_the_cpu_is_wrapped_with_a_warning_that_names_the_fix(caplog):
    # transformers 5 keeps a checkpoint's precision: e5-small's float16 ran 5 to 20 times slower on the CPU
    import logging

    with caplog.at_level(logging.WARNING, logger="subnets.hf.model"):
        with_subnetworks(tiny_tagger(dtype=torch.float16))
    assert "float16 on the CPU" in caplog.text and "dtype=torch.float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="subnets.hf.model"):
        with_subnetworks(tiny_tagger())
    assert "float16" not in caplog.text


def test_bad_input_says_what_is_wrong(languages):
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.config = transformers.PretrainedConfig(vocab_size=10)

        @property
        def base_model(self):
            return self

    with pytest.raises(UnknownLayoutError, match="Declare its layout"):
        with_subnetworks(Opaque())
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(target_policy="error"))
    find_subnetworks(model, {"de": languages["de"]})
    with pytest.raises(
        KeyError, match="no subnetwork for language 'fr' .*the set has: de.*target_policy='error'"
    ):
        model.set_language("fr")
    with pytest.raises(KeyError, match=r"set_language\('zz9'\): not a language code"):
        model.set_language("zz9")
    model.train()
    with pytest.raises(ValueError, match="a training batch without a language.*'language' column"):
        model(input_ids=torch.tensor(languages["de"][:2]["input_ids"]))
    with pytest.raises(ValueError, match="keep_ratio=1.5"):
        SubnetworkConfig(keep_ratio=1.5)
    trainer = SubnetworkTrainer(model, training_args("unused"), train_dataset=languages["de"].remove_columns("language"),
                                data_collator=transformers.default_data_collator)  # fmt: skip
    with pytest.raises(ValueError, match="a batch without a 'language' column"):
        trainer.train()


def test_treebanks_reach_datasets_offline_through_conllu_dataset_and_parquet(tmp_path):
    """The route README gives for the installed datasets (which runs no loading script):
    CoNLL-U -> Dataset -> parquet -> load_dataset("parquet") -> save_to_disk -> a treebank folder."""
    from conftest import SHARED

    from subnets.data.hf import conllu_dataset, read_dataset_split
    from subnets.data.treebank import read_conllu

    source = SHARED / "data" / "ud" / "it_isdt" / "dev.conllu"
    if not source.exists():
        pytest.skip(f"{source} not found")
    dataset = conllu_dataset(source, "it_isdt")
    dataset.to_parquet(str(tmp_path / "dev.parquet"))
    loaded = datasets.load_dataset("parquet", data_files={"validation": str(tmp_path / "dev.parquet")})
    loaded.save_to_disk(str(tmp_path / "ud" / "it_isdt"))
    read = read_dataset_split(tmp_path / "ud" / "it_isdt" / "validation").examples
    expected = read_conllu(source).examples
    assert len(read) == len(expected) == 200 and set(dataset["language"]) == {"it_isdt"}
    for a, b in zip(read, expected):
        assert (a.sent_id, a.forms, a.upos, a.heads, a.deprels) == (
            b.sent_id,
            b.forms,
            b.upos,
            b.heads,
            b.deprels,
        )


@pytest.mark.parametrize("architecture, units", [("bert", "both"), ("qwen2", "neurons")])
def test_a_pruned_transformer_computes_what_the_gated_one_does(tmp_path, architecture, units):
    from subnets.hf.prune import load_pruned, prune_units, save_pruned
    from subnets.models.encoder import build_tiny_transformer
    from subnets.models.gates import UnitGates

    model = build_tiny_transformer(60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                   architecture=architecture).eval()  # fmt: skip
    gates = UnitGates(model, units)
    keep = torch.rand(gates.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[:, 0] = True  # every layer keeps a unit of each kind
    keep[:, -1] = True
    inputs = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), gates.applied(keep.float()):
        gated = model(input_ids=inputs).last_hidden_state
    before = sum(p.numel() for p in model.parameters())
    counts = prune_units(model, gates, keep)
    gates.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs).last_hidden_state, gated, rtol=1e-5, atol=1e-6)
    # each removed neuron takes an input row (and its bias; two rows for a gated feed-forward) and an output column
    removed_neurons = int((~keep[:, -48:]).sum())
    per_neuron = {"bert": 32 + 1 + 32, "qwen2": 2 * 32 + 32}[architecture]
    per_head = 3 * (8 * 32 + 8) + 8 * 32 if units == "both" else 0
    assert counts == {
        "before": before,
        "after": before - removed_neurons * per_neuron - int((~keep[:, :4]).sum()) * per_head,
    }
    save_pruned(model, keep, gates.units, tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "pruned")(input_ids=inputs).last_hidden_state, gated,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_heads_of_grouped_query_attention_are_not_pruned():
    from subnets.hf.prune import prune_units
    from subnets.models.encoder import build_tiny_transformer
    from subnets.models.gates import UnitGates

    model = build_tiny_transformer(60, hidden_size=32, num_layers=2, num_heads=4, architecture="qwen2")
    gates = UnitGates(model, "heads")
    with pytest.raises(
        ValueError, match="heads of the .* layout cannot be pruned: its attention is grouped-query"
    ):
        prune_units(model, gates, torch.ones(gates.shape, dtype=torch.bool))
