"""Every method learns: each of the six (and the two random-mask controls) runs a small version of the default job (the default
model size, 300 sentences per language, 150 steps) and must reach a source LAS far above the
trivial parsers' (at most about 18, tests/test_learning.py) with a falling loss.

Bounds. Measured on 2 CPU cores (2026-12-01), the mean source LAS of the six methods lies
between 79 and 81 and the last logged loss is below 0.5 (first: about 4.3). The test asks for a
mean of at least 65 and a last logged loss below a quarter of the first. Static masks keep one
head per layer (``masks.top_k=4``), as iterative pruning does on these languages: with that
geometry ``maml_static`` diverged before its inner steps were clipped (mean source LAS 16,
loss 4.3 -> 12 with ``meta.inner_clip_norm=0``), so this test fails on that bug.
"""

import pytest
from conftest import tiny_config

from subnets.files import read_jsonl
from subnets.runner import run

SMALL_DEFAULT_JOB = [
    "model.tiny.num_layers=4",
    "model.tiny.hidden_size=128",
    "model.tiny.intermediate_size=256",
    "model.tiny.vocab_size=2000",
    "model.tiny.max_length=128",
    "task.arc_dim=256",
    "task.label_dim=128",
    "languages.synthetic.train=300",
    "languages.synthetic.dev=50",
    "languages.synthetic.test=50",
    "train.steps=150",
    "train.batch_size=32",
    "train.warmup_steps=40",
    "train.eval_every=75",
    "train.checkpoint_every=75",
    "train.log_every=15",
    "fewshot.repetitions=1",
    "fewshot.steps=5",
    "masks.selection=top_k",
    "masks.top_k=4",
    "masks.finetune_steps=20",
    "masks.importance_batches=2",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    ["baseline", "random", "static", "dynamic", "maml", "maml_random", "maml_static", "maml_dynamic"],
)
def test_every_method_learns_on_a_small_default_job(tmp_path, method):
    results = run(tiny_config(*SMALL_DEFAULT_JOB, f"+method={method}"), tmp_path)
    las = [scores["las"] for scores in results["source"].values()]
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 10
    assert sum(las) / len(las) >= 65, (method, las)
    assert losses[-1] < 0.25 * losses[0], (method, losses)
    assert results["diverging_log_intervals"] == 0
