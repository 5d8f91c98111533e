"""subnets.hf: what a saved subnetwork set holds (trained weights, checksums) and what loading refuses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from helpers import tagging_data, tagging_languages, tiny_tagger
from torch.utils.data import DataLoader

from subnets.hf import (
    SubnetworkConfig,
    SubnetworkModel,
    SubnetworkTrainer,
    find_subnetworks,
    with_subnetworks,
)


@pytest.fixture(scope="module")
def languages():
    return tagging_languages(32)


def train(model, folder, dataset, steps: int = 3, **kwargs) -> SubnetworkTrainer:
    args = transformers.TrainingArguments(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=8,
                                          learning_rate=3e-3, weight_decay=0.1, report_to=[], save_strategy="no",
                                          use_cpu=True, seed=3, disable_tqdm=True)  # fmt: skip
    trainer = SubnetworkTrainer(model, args, train_dataset=dataset, data_collator=transformers.default_data_collator,
                                **kwargs)  # fmt: skip
    trainer.train()
    return trainer


def logits(model: SubnetworkModel, inputs: torch.Tensor, language: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), model.language(language):
        return model(input_ids=inputs).logits


def saved_masks_only(folder: Path, languages) -> SubnetworkModel:
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="both"))
    find_subnetworks(model, languages)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("trained", ["all", "subnetwork"])
def test_trained_weights_load_in_another_process_onto_the_base_with_identical_outputs(
    tmp_path, languages, trained
):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="both", keep_ratio=0.5, train=trained))
    find_subnetworks(model, languages)
    train(model, tmp_path / "run", datasets.concatenate_datasets(list(languages.values())).shuffle(seed=0))
    model.save_pretrained(tmp_path / "set")
    inputs = torch.tensor(languages["fr"][:4]["input_ids"])
    expected = logits(model, inputs, "fr")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_hf_save import tiny_tagger, logits
        from subnets.hf import SubnetworkModel
        model = SubnetworkModel.from_pretrained(tiny_tagger(), {str(tmp_path / "set")!r})
        torch.save(logits(model, torch.load({str(tmp_path / "inputs.pt")!r}), "fr"), {str(tmp_path / "out.pt")!r})
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=environment)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    untrained = with_subnetworks(tiny_tagger(), model.subnetwork_config, masks=model.masks)
    assert not torch.equal(logits(untrained, inputs, "fr"), expected)
    config = json.loads((tmp_path / "set" / "config.json").read_text())
    stored = config["weights"]["tensors"]
    assert "classifier.weight" in stored and config["weights"]["file"] == "weights.safetensors"
    if trained == "subnetwork":  # the projections the units own and the task head, nothing shared
        assert stored and all(re.search(r"(query|key|value|dense)\.weight$|^classifier\.", n) for n in stored)
        assert not any("embeddings" in n or "LayerNorm" in n or n.endswith(".bias") and "classifier" not in n
                       for n in stored)  # fmt: skip
    assert set(config["base_model"]["fingerprint"]) == set(tiny_tagger().state_dict())
    # a base with other weights (another seed) is refused, the first differing tensor named
    with pytest.raises(ValueError, match=r"not the weights these subnetworks were trained from: "
                                         r"bert\.embeddings\.word_embeddings\.weight differs"):  # fmt: skip
        SubnetworkModel.from_pretrained(tiny_tagger(seed=1), str(tmp_path / "set"))


def test_a_set_of_masks_without_training_writes_no_weights(tmp_path, languages):
    model = saved_masks_only(tmp_path / "set", languages)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["README.md", "config.json",
                                                                     "subnetworks.safetensors"]  # fmt: skip
    assert json.loads((tmp_path / "set" / "config.json").read_text())["weights"] is None
    inputs = torch.tensor(languages["de"][:3]["input_ids"])
    loaded = SubnetworkModel.from_pretrained(tiny_tagger(), str(tmp_path / "set"))
    assert torch.equal(logits(loaded, inputs, "de"), logits(model, inputs, "de"))


def test_with_subnetworks_takes_masks(languages):
    found = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads"))
    find_subnetworks(found, languages)
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads"), masks=found.masks)
    assert list(model.masks) == ["de", "fr"] and model.update_mask(["de"]) is not None


def test_the_model_card_of_an_unnamed_base_has_no_link_and_no_made_up_name(tmp_path, languages):
    saved_masks_only(tmp_path / "set", languages)
    card = (tmp_path / "set" / "README.md").read_text()
    assert "a transformer" not in card and re.findall(r"\]\((.*?)\)", card) == [
        "https://github.com/subnets/subnets"
    ]
    assert 'from_pretrained("' not in card and "base_model:" not in card
    named = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="both"))
    named.model.config._name_or_path = "intfloat/multilingual-e5-small"
    named.save_pretrained(tmp_path / "named")
    card = (tmp_path / "named" / "README.md").read_text()
    assert "[intfloat/multilingual-e5-small](https://huggingface.co/intfloat/multilingual-e5-small)" in card
    assert 'from_pretrained("intfloat/multilingual-e5-small")' in card


def test_a_damaged_set_is_refused_naming_the_file(tmp_path, languages):
    saved_masks_only(tmp_path / "set", languages)
    config_path = tmp_path / "set" / "config.json"
    original = config_path.read_text()
    without = json.loads(original)
    del without["config"]
    config_path.write_text(json.dumps(without))
    with pytest.raises(ValueError, match=rf"{config_path}: no 'config' section"):
        SubnetworkModel.from_pretrained(tiny_tagger(), str(tmp_path / "set"))
    config_path.write_text(original[:-20])
    with pytest.raises(ValueError, match=rf"{config_path} .*not valid JSON at line \d+"):
        SubnetworkModel.from_pretrained(tiny_tagger(), str(tmp_path / "set"))
    config_path.write_text(original)
    masks_path = tmp_path / "set" / "subnetworks.safetensors"
    data = bytearray(masks_path.read_bytes())
    data[-1] ^= 1
    masks_path.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=rf"{masks_path}: its sha256 .* is not the one {config_path} records"
    ):
        SubnetworkModel.from_pretrained(tiny_tagger(), str(tmp_path / "set"))
    with pytest.raises(FileNotFoundError, match=r"no-such-set: no such folder"):
        SubnetworkModel.from_pretrained(tiny_tagger(), str(tmp_path / "no-such-set"))


def test_trainer_warns_of_languages_without_a_subnetwork_once_each(tmp_path, languages, caplog):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads"))
    find_subnetworks(model, languages)
    mixed = datasets.concatenate_datasets(
        [languages["de"], tagging_data("zz", 16, 2), tagging_data(None, 16, 3)]
    )
    with caplog.at_level("WARNING", logger="subnets.hf"):
        train(model, tmp_path, mixed.shuffle(seed=0), steps=6)
    warned = [r.getMessage() for r in caplog.records if "no subnetwork for language" in r.getMessage()]
    assert len(warned) == 2 and any("'zz'" in m for m in warned) and any("None" in m for m in warned)
    assert all("the set has: de, fr" in m and "whole model" in m for m in warned)
    strict = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads", target_policy="error"),
                              masks=model.masks)  # fmt: skip
    with pytest.raises(KeyError, match=r"no subnetwork for language 'zz' \(the set has: de, fr\)"):
        train(strict, tmp_path, tagging_data("zz", 16, 2))


def test_language_grouped_batches_without_a_language_column_name_it(tmp_path, languages):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads"))
    find_subnetworks(model, languages)
    with pytest.raises(
        ValueError, match=r"without a 'language' column \(columns: input_ids, attention_mask, labels\)"
    ):
        train(model, tmp_path, languages["de"].remove_columns("language"), languages_per_batch="one")


def test_find_subnetworks_refuses_a_language_without_data(languages):
    model = with_subnetworks(tiny_tagger(), SubnetworkConfig(units="heads"))
    with pytest.raises(ValueError, match=r"find_subnetworks: language 'aa' has no batches"):
        find_subnetworks(model, {"de": languages["de"], "aa": DataLoader([])})
    with pytest.raises(ValueError, match=r"find_subnetworks: language 'aa' has no examples"):
        find_subnetworks(model, {"aa": languages["de"].select([])})
    assert not len(model.masks)
