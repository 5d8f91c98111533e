"""A training step of each comparison method against the baseline step, on the parsing task:

* ``masked``: the static subnetwork's exact masked step (half the heads of each layer);
* ``lora``: LoRA (rank 8 on query, key, value and attention output, ``+method=lora``): the
  encoder frozen, its low-rank matrices and the task head trained;
* ``lt_sft``: the sparse phase of lottery-ticket sparse fine-tuning (5% of the encoder's
  parameters, an unstructured mask through the masked optimizer).

Each is a full step (forward, backward, clipping, AdamW) on the same batches as the baseline
(full fine-tuning), the variants interleaved in rounds; ratios are of median times.

Usage::

    python benchmarks/method_step.py                       # tiny and e5 (SUBNETS_E5_PATH)
    python benchmarks/method_step.py --models tiny --rounds 5
    python benchmarks/method_step.py --smoke               # tiny, 2 steps of 4 sentences: does it run

Run it alone: timings on two cores are disturbed by any other job.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from shared_paths import e5_path
from task_step import interleaved

from subnets.config import compose_config
from subnets.masks.subnetwork import unit_parameter_masks
from subnets.methods.adapters import LoraPolicy
from subnets.methods.sft import ticket
from subnets.optim.masked import MaskedOptimizer, UpdateMask
from subnets.training.assemble import assemble
from subnets.training.update import parameter_groups, training_step


def measure(model: str, args) -> dict[str, float]:
    torch.manual_seed(0)
    overrides = ["model=e5_small", f"model.name_or_path={e5_path()}"] if model == "e5" else []
    cfg = compose_config([*overrides, "languages.synthetic.train=200", "model.mix_dropout=0.0"])
    with tempfile.TemporaryDirectory() as folder:
        parts = assemble(cfg, folder)
    net, batcher = parts.model, parts.batcher
    lora_net = copy.deepcopy(net)
    LoraPolicy(cfg.lora).bind(lora_net, batcher, list(parts.data.train))

    def adamw(model):
        return MaskedOptimizer(
            torch.optim.AdamW(parameter_groups(model, 5e-5, 1e-3, 0.01)), model.named_parameters()
        )

    optimizer, lora_optimizer = adamw(net), adamw(lora_net)
    generator = torch.Generator().manual_seed(0)
    unit_mask = torch.rand(net.gates.shape, generator=generator).argsort(dim=1) < net.gates.num_heads // 2
    heads = unit_parameter_masks(net, unit_mask)
    encoder = dict(net.encoder_parameters())
    moved = {n: torch.rand(p.shape, generator=generator) for n, p in encoder.items()}
    sparse = UpdateMask(ticket(moved, int(0.05 * sum(p.numel() for p in encoder.values()))))
    languages = list(parts.data.train.values())
    batches = [batcher.of(languages[i % len(languages)], range(i // len(languages) * args.batch_size % 150,
                                                                i // len(languages) * args.batch_size % 150
                                                                + args.batch_size)) for i in range(args.steps)]  # fmt: skip
    variants = {
        "baseline": lambda b: training_step(net, b, optimizer, clip_norm=5.0),
        "masked": lambda b: training_step(net, b, optimizer, update_mask=heads, clip_norm=5.0),
        "lora": lambda b: training_step(lora_net, b, lora_optimizer, clip_norm=5.0),
        "lt_sft": lambda b: training_step(net, b, optimizer, update_mask=sparse, clip_norm=5.0),
    }
    for batch in batches[: args.warmup]:
        for step in variants.values():
            step(batch)
    times = interleaved(variants, batches, args.rounds)
    return {name: seconds / times["baseline"] for name, seconds in times.items()} | {
        "seconds": times["baseline"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,e5")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (distinct batches)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(models="tiny", steps=2, warmup=1, rounds=1, batch_size=4)
    print(
        f"{'model':6s} {'baseline s/step':>15s} {'masked':>8s} {'lora':>8s} {'lt_sft':>8s}  (ratios to the baseline step)"
    )
    for model in args.models.split(","):
        r = measure(model, args)
        print(
            f"{model:6s} {r['seconds']:15.3f} {r['masked']:8.3f} {r['lora']:8.3f} {r['lt_sft']:8.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
