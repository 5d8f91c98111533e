"""Training-step benchmark per task: the baseline step and the masked (static) step of every task.

For each task (parsing, UPOS tagging, NER, classification, masked LM; causal LM with the tiny
Qwen2 decoder) and model (the tiny random BERT, multilingual-e5-small), it builds the run as the
runner does (:func:`subnets.training.assemble.assemble`, on the synthetic languages and their NER and
classification variants), draws language-homogeneous training batches and reports:

* the baseline step (forward, backward, clipping, AdamW) in seconds and examples' words per second;
* the masked step (exact update restricted to half the heads, ``method.apply=gradient``, through
  the masked optimizer) against the baseline step on the same model and batches (target <= 1.05).

Ratios compare median times of the two steps run in the same process, rounds interleaved.

Usage::

    python benchmarks/task_step.py                              # tiny and e5, every task
    python benchmarks/task_step.py --models tiny --steps 30 --rounds 3
    python benchmarks/task_step.py --smoke                      # tiny, every task, 2 steps: does it run

Needs SUBNETS_E5_PATH (default ../shared/models/multilingual-e5-small) for e5.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from shared_paths import e5_path

from subnets.config import compose_config
from subnets.masks.subnetwork import unit_parameter_masks
from subnets.optim.masked import MaskedOptimizer
from subnets.training.assemble import assemble
from subnets.training.update import parameter_groups, training_step

TASKS = {"parsing": ["task=parsing"], "pos": ["task=pos"], "ner": ["task=ner"],
         "classification": ["task=classification"], "mlm": ["task=mlm"], "clm": ["task=clm", "model=tiny_qwen2"]}  # fmt: skip


def interleaved(variants: dict, inputs, rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant over ``inputs``, rounds interleaved."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            for x in inputs:
                start = time.perf_counter()
                call(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(task: str, model: str, args) -> dict:
    torch.manual_seed(0)
    overrides = list(TASKS[task])
    if model == "e5":
        overrides += ["model=e5_small", f"model.name_or_path={e5_path()}"]
    cfg = compose_config([*overrides, "languages.synthetic.train=200", "model.mix_dropout=0.0"])
    with tempfile.TemporaryDirectory() as folder:
        parts = assemble(cfg, folder)
    net, batcher = parts.model, parts.batcher
    optimizer = torch.optim.AdamW(parameter_groups(net, 5e-5, 1e-3, 0.01))
    masked_optimizer = MaskedOptimizer(optimizer, net.named_parameters())
    generator = torch.Generator().manual_seed(0)
    unit_mask = torch.rand(net.gates.shape, generator=generator).argsort(dim=1) < net.gates.num_heads // 2
    update_mask = unit_parameter_masks(net, unit_mask)
    languages = list(parts.data.train.values())
    batches = [batcher.of(languages[i % len(languages)], range((i // len(languages)) * args.batch_size % 150,
                                                                (i // len(languages)) * args.batch_size % 150
                                                                + args.batch_size)) for i in range(args.steps)]  # fmt: skip

    def baseline(batch):
        training_step(net, batch, optimizer, clip_norm=5.0)

    def masked(batch):
        training_step(net, batch, masked_optimizer, update_mask=update_mask, clip_norm=5.0)

    for batch in batches[: args.warmup]:
        baseline(batch)
        masked(batch)
    times = interleaved({"baseline": baseline, "masked": masked}, batches, args.rounds)
    words = sum(b.num_words for b in batches) / len(batches)
    return {"task": task, "model": model, "seconds": times["baseline"], "units_per_second": words / times["baseline"],
            "count": parts.task.count, "masked_ratio": times["masked"] / times["baseline"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,e5")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=12, help="timed steps (distinct batches)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(models="tiny", steps=2, warmup=1, rounds=1, batch_size=4)
    print(
        f"{'task':15s} {'model':5s} {'s/step':>8s} {'units/s':>9s} {'units':8s} masked/baseline (target <= 1.05)"
    )
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            if model == "e5" and task == "clm":
                continue  # e5 is an encoder: no causal LM
            r = measure(task, model, args)
            print(f"{task:15s} {model:5s} {r['seconds']:8.3f} {r['units_per_second']:9.0f} {r['count']:8s} "
                  f"{r['masked_ratio']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
