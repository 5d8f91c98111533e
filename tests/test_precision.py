"""Speed options: train.precision=bf16 (bfloat16 autocast) and train.compile=true (torch.compile of the
encoder); head gates and masked updates stay exact under both, and runs learn."""

import pytest
import torch
from conftest import step_on, tiny_config, tiny_transformer
from helpers import changed_outside, masked_step

from subnets.files import read_jsonl
from subnets.models.encoder import Encoder
from subnets.training.runner import Run


def encoder_inputs(seed=0, batch=3, length=11):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask, torch.arange(batch * length)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bf16_autocast_runs_the_encoder_in_bfloat16_and_returns_float32(attn):
    transformer = tiny_transformer("bert", attn)
    full, half = Encoder(transformer), Encoder(transformer, autocast=torch.bfloat16)
    half.mix.load_state_dict(full.mix.state_dict())
    reference, output = full(*encoder_inputs()), half(*encoder_inputs())
    assert output.dtype == torch.float32
    assert not torch.equal(output, reference)  # really computed in bfloat16
    assert torch.allclose(output, reference, rtol=0.05, atol=0.05)  # bfloat16 keeps ~3 significant digits
    assert next(transformer.parameters()).dtype == torch.float32


def test_head_gates_stay_exact_under_bf16_autocast():
    transformer = tiny_transformer("bert", "eager")
    encoder = Encoder(transformer, autocast=torch.bfloat16)
    reference = encoder(*encoder_inputs())
    gates = encoder.gates
    with gates.applied(torch.ones(gates.shape)):
        assert torch.equal(encoder(*encoder_inputs()), reference)  # gates of 1: the ungated output
    layer, head, d = 1, 2, gates.head_dim
    values = torch.ones(gates.shape)
    values[layer, head] = 0
    with gates.applied(values):
        gated = encoder(*encoder_inputs())
    projection = gates.outputs["heads"][layer]
    with torch.no_grad():
        projection.weight[:, head * d : (head + 1) * d] = 0
    assert torch.equal(gated, encoder(*encoder_inputs()))  # gate 0 = that head's columns zeroed
    assert not torch.equal(gated, reference)


@pytest.mark.parametrize("method", ["baseline", "static"])
def test_a_bf16_run_learns(tmp_path, method):
    settings = [f"+method={method}", "train.precision=bf16", "train.steps=30", "masks.finetune_steps=5",
                "masks.importance_batches=2", "masks.batch_size=4"]  # fmt: skip
    experiment = Run(tiny_config(*settings), tmp_path)
    experiment.setup()
    try:
        assert experiment.model.encoder.autocast == torch.bfloat16
        experiment.train()
    finally:
        experiment.close()
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_head_gates_stay_exact_in_a_compiled_encoder():
    """train.compile=true compiles the encoder in place (nn.Module.compile): gates of 1 give
    the compiled ungated output bit for bit, a gate of 0 that head's columns zeroed."""
    transformer = tiny_transformer("bert", "sdpa")
    encoder = Encoder(transformer)
    eager = encoder(*encoder_inputs())
    transformer.compile()
    ungated = encoder(*encoder_inputs())
    assert torch.allclose(ungated, eager, atol=1e-5)
    gates = encoder.gates
    with gates.applied(torch.ones(gates.shape)):
        assert torch.equal(encoder(*encoder_inputs()), ungated)
    layer, head, d = 1, 2, gates.head_dim
    values = torch.ones(gates.shape)
    values[layer, head] = 0
    with gates.applied(values):
        gated = encoder(*encoder_inputs())
    with torch.no_grad():
        gates.outputs["heads"][layer].weight[:, head * d : (head + 1) * d] = 0
    assert torch.allclose(gated, encoder(*encoder_inputs()), atol=1e-6)
    assert not torch.allclose(gated, ungated, atol=1e-4)
    assert set(transformer.state_dict()) == set(
        tiny_transformer("bert", "sdpa").state_dict()
    )  # names unchanged


@pytest.mark.slow
@pytest.mark.first
def test_a_compiled_static_run_learns_and_its_masked_updates_stay_exact(tmp_path):
    """Compiled with dynamic shapes from the first batch on: one graph for the training batches'
    lengths instead of one per length until Dynamo makes them dynamic (half the compilation time of
    a cold cache, C++ compilation mostly). Static shapes under gates: the test above."""
    settings = ["+method=static", "train.compile=true", "train.steps=30", "masks.finetune_steps=5",
                "masks.importance_batches=2", "masks.batch_size=4", "masks.selection=keep_ratio"]  # fmt: skip
    experiment = Run(tiny_config(*settings), tmp_path)
    experiment.setup()
    try:
        with torch._dynamo.config.patch(assume_static_by_default=False):
            for _ in range(3):
                _, owned, before, after = masked_step(experiment)
                assert not changed_outside(owned, before, after)
            experiment.train()
    finally:
        experiment.close()
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_compile_is_refused_with_second_order_maml(tmp_path):
    from subnets.config import SettingError
    from subnets.training.runner import run

    with pytest.raises(SettingError, match="no double backward"):
        run(tiny_config("+method=maml", "train.compile=true", "meta.first_order=false"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task", [["+method=static", "masks.finetune_steps=2", "masks.importance_batches=1"], ["task=clm", "model=tiny_qwen2"]],
                         ids=["parsing_static", "clm"])  # fmt: skip
def test_fp64_keeps_weights_activations_and_optimizer_state_in_float64(tmp_path, task):
    experiment = Run(tiny_config(*task, "train.precision=fp64"), tmp_path)
    experiment.setup()
    try:
        assert {p.dtype for p in experiment.model.parameters()} == {torch.float64}
        step_on(experiment, "syn_svo")
        moments = [s["exp_avg"] for s in experiment.optimizer.state.values() if "exp_avg" in s]
        assert moments and {m.dtype for m in moments} == {torch.float64}
        batch = next(iter(experiment.batcher.fixed(experiment.data.dev["syn_svo_na"], 4, 1, "dev")))
        assert experiment.model(batch).loss.dtype == torch.float64
    finally:
        experiment.close()
