"""Mask objects: Subnetwork, SubnetworkSet (checks, saving, summaries) and unit_parameter_masks."""

import copy

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import tiny_transformer
from safetensors.torch import save_file
from torch import nn

from subnets.masks.subnetwork import MaskMismatchError, Subnetwork, SubnetworkSet, unit_parameter_masks
from subnets.models.encoder import build_tiny_transformer
from subnets.models.gates import HeadGates

QUERY = "transformer.encoder.layer.{}.attention.self.query.{}"
KEY = "transformer.encoder.layer.{}.attention.self.key.{}"
VALUE = "transformer.encoder.layer.{}.attention.self.value.{}"
OUTPUT = "transformer.encoder.layer.{}.attention.output.dense.{}"
FEED_FORWARD = "transformer.encoder.layer.{}.intermediate.dense.weight"


class Wrapper(nn.Module):
    """A small model with ``.gates``, as SubnetworkSet.for_model and unit_parameter_masks expect."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.gates = HeadGates(self.transformer)

    def forward(self, input_ids, attention_mask):
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def wrapper(layers=2, heads=4):
    return Wrapper(tiny_transformer(layers=layers, heads=heads))


def wide_wrapper():
    """Same (layers, heads) = (2, 4) as wrapper(), but hidden size 48 instead of 32."""
    transformer = build_tiny_transformer(
        vocab_size=120, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=64,
        max_length=64, attn_implementation="eager", seed=0, pad_token_id=0,
    )  # fmt: skip
    return Wrapper(transformer.eval())


def inputs(seed=0, batch=3, length=9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def heads(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# Subnetwork ---------------------------------------------------------------------------------------


def test_subnetwork_converts_masks_to_bool_on_cpu():
    s = Subnetwork(
        torch.tensor([[1, 0], [2, 0]]),
        {"w": torch.tensor([0.0, 3.0, 0.0])},
        scores=torch.tensor([[1, 2], [3, 4]], dtype=torch.float64, requires_grad=True),
    )
    assert s.unit_mask.dtype == torch.bool and s.unit_mask.device.type == "cpu"
    assert s.unit_mask.tolist() == [[True, False], [True, False]]
    assert s.param_masks["w"].dtype == torch.bool and s.param_masks["w"].device.type == "cpu"
    assert s.param_masks["w"].tolist() == [False, True, False]
    assert s.scores.dtype == torch.float32 and not s.scores.requires_grad
    assert s.scores.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert s.num_units_kept == 2


def test_sparsity_and_layer_sparsity_by_hand():
    s = Subnetwork(heads([1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]))
    # 7 of 12 heads kept; per layer 4/4, 2/4, 1/4 kept.
    assert s.num_units_kept == 7
    assert s.sparsity() == pytest.approx(5 / 12)
    assert s.layer_sparsity() == pytest.approx([0.0, 0.5, 0.75])


def test_param_sparsity_by_hand():
    params = {
        "a": heads([1, 1, 0], [1, 1, 0]),  # 4 of 6 kept
        "b": torch.zeros(4, dtype=torch.bool),  # 0 of 4 kept
    }
    s = Subnetwork(heads([1, 0]), params)
    # Over all coordinates: 4 of 10 kept (not the mean of per-tensor sparsities, 2/3).
    assert s.param_sparsity() == pytest.approx(0.6)


def test_param_sparsity_none_without_parameter_masks():
    assert Subnetwork(heads([1, 0])).param_sparsity() is None


# SubnetworkSet checks -----------------------------------------------------------------------------


def test_for_model_reads_geometry_and_parameter_shapes():
    model = wrapper(layers=2, heads=4)
    masks = SubnetworkSet.for_model(model)
    assert (masks.num_layers, masks.units) == (2, {"heads": 4})
    assert masks.param_shapes[QUERY.format(1, "weight")] == (32, 32)
    assert masks.param_shapes[FEED_FORWARD.format(0)] == (64, 32)
    assert len(masks) == 0


def test_head_mask_of_wrong_shape_is_rejected():
    masks = SubnetworkSet.for_model(wrapper(layers=2, heads=4))
    with pytest.raises(MaskMismatchError, match=r"\(2, 4\)") as error:
        masks["en"] = Subnetwork(torch.ones(3, 4, dtype=torch.bool))
    assert "(3, 4)" in str(error.value)
    with pytest.raises(MaskMismatchError, match=r"\(2, 4\)"):
        masks["en"] = Subnetwork(torch.ones(2, 3, dtype=torch.bool))
    assert "en" not in masks
    masks["en"] = Subnetwork(torch.ones(2, 4, dtype=torch.bool))
    assert list(masks) == ["en"]


def test_parameter_mask_for_unknown_parameter_is_rejected():
    masks = SubnetworkSet.for_model(wrapper())
    bad = Subnetwork(torch.ones(2, 4), {"transformer.no.such.weight": torch.ones(3)})
    with pytest.raises(MaskMismatchError, match="transformer.no.such.weight"):
        masks["en"] = bad
    assert len(masks) == 0


def test_parameter_mask_of_wrong_shape_names_both_shapes():
    masks = SubnetworkSet.for_model(wrapper())
    name = FEED_FORWARD.format(0)
    bad = Subnetwork(torch.ones(2, 4), {name: torch.ones(32, 64)})
    with pytest.raises(MaskMismatchError) as error:
        masks["en"] = bad
    message = str(error.value)
    assert name in message and "(32, 64)" in message and "(64, 32)" in message
    assert len(masks) == 0


# Saving and loading -------------------------------------------------------------------------------


def three_languages(model: nn.Module) -> SubnetworkSet:
    """'sw' heads only; 'en' with parameter masks; 'de' with scores (not in alphabetical order)."""
    generator = torch.Generator().manual_seed(1)
    masks = SubnetworkSet.for_model(model)
    masks["sw"] = Subnetwork(heads([1, 0, 1, 1], [0, 1, 1, 0]))
    en_heads = heads([1, 1, 0, 1], [1, 0, 0, 1])
    params = unit_parameter_masks(model, en_heads)
    params[FEED_FORWARD.format(1)] = torch.rand(64, 32, generator=generator) > 0.5
    masks["en"] = Subnetwork(en_heads, params)
    masks["de"] = Subnetwork(heads([0, 0, 1, 1], [1, 1, 1, 0]), scores=torch.randn(2, 4, generator=generator))
    return masks


def assert_identical(loaded: SubnetworkSet, original: SubnetworkSet):
    assert list(loaded) == list(original)
    assert (loaded.num_layers, loaded.units) == (original.num_layers, original.units)
    for language, expected in original.items():
        got = loaded[language]
        assert got.unit_mask.dtype == torch.bool
        assert torch.equal(got.unit_mask, expected.unit_mask)
        assert set(got.param_masks) == set(expected.param_masks)
        for name, mask in expected.param_masks.items():
            assert got.param_masks[name].dtype == torch.bool
            assert torch.equal(got.param_masks[name], mask)
        if expected.scores is None:
            assert got.scores is None
        else:
            assert got.scores.dtype == expected.scores.dtype
            assert torch.equal(got.scores, expected.scores)  # bit-identical


def test_save_load_round_trip(tmp_path):
    model = wrapper()
    masks = three_languages(model)
    path = masks.save(tmp_path / "sub" / "masks.safetensors")
    assert path.exists()
    assert_identical(SubnetworkSet.load(path), masks)
    assert_identical(SubnetworkSet.load(path, expect=model), masks)
    assert_identical(SubnetworkSet.load(path, expect=masks), masks)
    assert list(SubnetworkSet.load(path)) == ["sw", "en", "de"]


def test_loaded_set_with_expect_accepts_new_parameter_masks(tmp_path):
    model = wrapper()
    path = three_languages(model).save(tmp_path / "masks.safetensors")
    loaded = SubnetworkSet.load(path, expect=model)
    # A parameter no saved mask covered is known from the model after loading with expect.
    name = FEED_FORWARD.format(0)
    loaded["xx"] = Subnetwork(torch.ones(2, 4), {name: torch.ones(64, 32)})
    assert torch.equal(loaded["xx"].param_masks[name], torch.ones(64, 32, dtype=torch.bool))


@pytest.mark.parametrize("layers,num_heads", [(3, 4), (2, 2)])
def test_load_for_model_of_other_geometry_names_both_shapes(tmp_path, layers, num_heads):
    path = three_languages(wrapper()).save(tmp_path / "masks.safetensors")
    with pytest.raises(MaskMismatchError) as error:
        SubnetworkSet.load(path, expect=wrapper(layers=layers, heads=num_heads))
    message = str(error.value)
    assert "(2, 4)" in message and f"({layers}, {num_heads})" in message


def test_load_for_model_of_other_hidden_size_names_both_parameter_shapes(tmp_path):
    model = wrapper()
    masks = SubnetworkSet.for_model(model)
    name = FEED_FORWARD.format(0)
    masks["en"] = Subnetwork(torch.ones(2, 4), {name: torch.ones(64, 32)})
    path = masks.save(tmp_path / "masks.safetensors")
    other = wide_wrapper()
    assert (other.gates.num_layers, other.gates.num_heads) == (2, 4)  # only the hidden size differs
    with pytest.raises(MaskMismatchError) as error:
        SubnetworkSet.load(path, expect=other)
    message = str(error.value)
    assert name in message and "(64, 32)" in message and "(64, 48)" in message


def test_head_masks_only_load_into_model_of_other_hidden_size(tmp_path):
    path = SubnetworkSet.for_model(wrapper()).save(tmp_path / "empty.safetensors")
    assert len(SubnetworkSet.load(path, expect=wide_wrapper())) == 0
    masks = SubnetworkSet.for_model(wrapper())
    masks["en"] = Subnetwork(heads([1, 0, 1, 0], [0, 1, 0, 1]))
    path = masks.save(tmp_path / "heads.safetensors")
    loaded = SubnetworkSet.load(path, expect=wide_wrapper())
    assert torch.equal(loaded["en"].unit_mask, masks["en"].unit_mask)


def test_load_rejects_safetensors_file_without_mask_metadata(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"en/heads": torch.ones(2, 4, dtype=torch.uint8)}, str(path))
    with pytest.raises(ValueError, match="not a subnets mask file") as error:
        SubnetworkSet.load(path)
    assert not isinstance(error.value, MaskMismatchError)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="something-else"):
        SubnetworkSet.load(other)


def test_load_rejects_file_that_is_not_safetensors_with_value_error(tmp_path):
    # E.g. a torch checkpoint or a text file passed as the mask file by mistake.
    path = tmp_path / "masks.safetensors"
    path.write_text("this is not a mask file\n")
    with pytest.raises(ValueError):
        SubnetworkSet.load(path)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"heads": torch.ones(2, 4)}, checkpoint)
    with pytest.raises(ValueError):
        SubnetworkSet.load(checkpoint)


def test_state_dict_round_trip():
    model = wrapper()
    masks = three_languages(model)
    state = masks.state_dict()
    assert state["num_layers"] == 2 and state["units"] == {"heads": 4}
    assert list(state["masks"]) == ["sw", "en", "de"]
    restored = SubnetworkSet.from_state_dict(copy.deepcopy(state), masks.param_shapes)
    assert_identical(restored, masks)
    # Heads-only sets need no parameter shapes.
    heads_only = SubnetworkSet(2, 4)
    heads_only["sw"] = masks["sw"]
    heads_only["de"] = masks["de"]
    assert_identical(SubnetworkSet.from_state_dict(heads_only.state_dict()), heads_only)


def test_from_state_dict_checks_shapes():
    masks = three_languages(wrapper())
    state = masks.state_dict()
    state["units"] = {"heads": 3}
    with pytest.raises(MaskMismatchError, match=r"\(2, 3\)"):
        SubnetworkSet.from_state_dict(state, masks.param_shapes)


def test_checkpoint_state_written_before_neuron_units_still_loads():
    masks = three_languages(wrapper())
    state = masks.state_dict()
    old = {"num_layers": 2, "num_heads": 4, "masks": state["masks"]}
    assert_identical(SubnetworkSet.from_state_dict(old, masks.param_shapes), masks)


# Summaries ----------------------------------------------------------------------------------------


def jaccard_set() -> SubnetworkSet:
    masks = SubnetworkSet(2, 3, {"w": (4,)})
    masks["a"] = Subnetwork(heads([1, 1, 0], [0, 1, 0]))  # {(0,0), (0,1), (1,1)}
    masks["b"] = Subnetwork(heads([1, 0, 0], [0, 1, 1]))  # {(0,0), (1,1), (1,2)}
    masks["c"] = Subnetwork(heads([0, 0, 1], [1, 0, 1]))  # {(0,2), (1,0), (1,2)}
    return masks


def test_jaccard_by_hand():
    languages, overlap = jaccard_set().jaccard()
    assert languages == ["a", "b", "c"]
    assert isinstance(overlap, np.ndarray) and overlap.shape == (3, 3)
    # a&b = {(0,0), (1,1)}: 2 / 4;  a&c = {}: 0 / 6;  b&c = {(1,2)}: 1 / 5.
    expected = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    np.testing.assert_allclose(overlap, expected, atol=1e-7)
    np.testing.assert_array_equal(overlap, overlap.T)
    np.testing.assert_array_equal(np.diag(overlap), np.ones(3))


def test_sparsity_summary_by_hand():
    masks = jaccard_set()
    masks["d"] = Subnetwork(heads([1, 1, 1], [0, 0, 0]), {"w": torch.tensor([True, False, False, False])})
    summary = masks.sparsity()
    assert list(summary) == ["a", "b", "c", "d"]
    assert summary["a"]["units_kept"] == 3
    assert summary["a"]["sparsity"] == pytest.approx(0.5)
    assert summary["a"]["layer_sparsity"] == pytest.approx([1 / 3, 2 / 3])
    assert summary["b"]["layer_sparsity"] == pytest.approx([2 / 3, 1 / 3])
    assert "param_sparsity" not in summary["a"]
    assert summary["d"]["units_kept"] == 3
    assert summary["d"]["layer_sparsity"] == pytest.approx([0.0, 1.0])
    assert summary["d"]["param_sparsity"] == pytest.approx(0.75)


def test_overlap_figure_saves_png_with_one_tick_per_language(tmp_path):
    masks = jaccard_set()
    figure = masks.overlap_figure(title="overlap")
    try:
        path = tmp_path / "overlap.png"
        figure.savefig(path)
        assert path.exists() and path.stat().st_size > 0
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        axis = figure.axes[0]
        assert [t.get_text() for t in axis.get_xticklabels()] == ["a", "b", "c"]
        assert [t.get_text() for t in axis.get_yticklabels()] == ["a", "b", "c"]
        assert axis.get_title() == "overlap"
    finally:
        plt.close(figure)


# unit_parameter_masks -----------------------------------------------------------------------------


def test_unit_parameter_masks_own_exactly_the_heads_rows_and_columns():
    model = wrapper(layers=2, heads=4)
    d = model.gates.head_dim
    assert d == 8
    unit_mask = torch.ones(2, 4, dtype=torch.bool)
    unit_mask[1, 2] = False
    masks = unit_parameter_masks(model, unit_mask)

    expected_names = {
        pattern.format(layer, kind)
        for layer in range(2)
        for pattern in (QUERY, KEY, VALUE)
        for kind in ("weight", "bias")
    } | {OUTPUT.format(layer, "weight") for layer in range(2)}
    assert set(masks) == expected_names  # no output bias, feed-forward or LayerNorm
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == parameters[name].shape, name

    off = slice(2 * d, 3 * d)
    for pattern in (QUERY, KEY, VALUE):
        weight, bias = masks[pattern.format(1, "weight")], masks[pattern.format(1, "bias")]
        assert not weight[off].any() and not bias[off].any()
        assert int((~weight).sum()) == d * 32 and int((~bias).sum()) == d
        assert masks[pattern.format(0, "weight")].all() and masks[pattern.format(0, "bias")].all()
    output = masks[OUTPUT.format(1, "weight")]
    assert not output[:, off].any()
    assert int((~output).sum()) == 32 * d
    assert masks[OUTPUT.format(0, "weight")].all()


def test_unit_parameter_masks_follow_the_head_mask_per_layer():
    model = wrapper(layers=2, heads=4)
    unit_mask = heads([0, 1, 1, 0], [1, 1, 1, 1])
    masks = unit_parameter_masks(model, unit_mask)
    rows = masks[KEY.format(0, "weight")][:, 0]
    assert rows.tolist() == [False] * 8 + [True] * 16 + [False] * 8
    assert masks[OUTPUT.format(0, "weight")][0].tolist() == rows.tolist()
    assert masks[KEY.format(1, "weight")].all()


def test_zeroing_the_masked_coordinates_equals_gating_the_head_off():
    model = wrapper(layers=2, heads=4)
    unit_mask = torch.ones(2, 4, dtype=torch.bool)
    unit_mask[1, 2] = False
    masks = unit_parameter_masks(model, unit_mask)

    with torch.no_grad():
        reference = model(**inputs())
        with model.gates.applied(unit_mask.float()):
            gated = model(**inputs())
        zeroed_model = copy.deepcopy(model)
        zeroed_model.gates.set(None)
        for name, parameter in zeroed_model.named_parameters():
            if name in masks:
                parameter[~masks[name]] = 0.0
        zeroed = zeroed_model(**inputs())

    assert not torch.allclose(gated, reference, atol=1e-4)  # the head matters
    torch.testing.assert_close(zeroed, gated, atol=1e-6, rtol=0)
    # The original model is untouched.
    assert not torch.equal(
        dict(model.named_parameters())[OUTPUT.format(1, "weight")][:, 16:24], torch.zeros(32, 8)
    )
