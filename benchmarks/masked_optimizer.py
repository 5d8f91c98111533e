"""The masked optimizer step against the bare AdamW step, on the same gradients.

For multilingual-e5-small (the runner's parser on it, real UD batches) and a Qwen2-style decoder
of about 57M parameters (random weights from a config), half the heads of every layer masked
(the update mask a static subnetwork passes: :class:`~subnets.optim.UpdateMask`), it times

* the bare AdamW step (``torch.optim.AdamW``, the runner's parameter groups for e5);
* the masked step (:class:`~subnets.optim.MaskedOptimizer`): Adam's update on the coordinates
  the mask lets move only;
* the masked step by its general path (``adam_in_place = False``: every coordinate stepped, the
  frozen ones saved and written back), the implementation before 2026-12-06;

and prints each masked step's time over the bare step's. Ratios compare median times of the
variants run in the same process, rounds interleaved (each round restores the gradients first;
that copy is timed alone and subtracted).

Usage::

    python benchmarks/masked_optimizer.py            # both models, 20 rounds
    python benchmarks/masked_optimizer.py --models qwen2 --rounds 40
    python benchmarks/masked_optimizer.py --smoke     # a 2-layer qwen2, 2 rounds: does it run

Needs SUBNETS_UD_ROOT (default ../shared/data/ud) and SUBNETS_E5_PATH
(default ../shared/models/multilingual-e5-small) for e5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from subnets.masks.subnetwork import unit_parameter_masks
from subnets.models.gates import UnitGates
from subnets.optim import MaskedOptimizer, UpdateMask


def e5_step() -> tuple[torch.nn.Module, torch.optim.Optimizer, UpdateMask]:
    """The parser on multilingual-e5-small after one backward pass, its AdamW and a mask."""
    from train_step import batches, build

    model, optimizer, collator, data, device = build("e5", 64)
    model(batches(collator, data, 16, 1, device)[0]).loss.backward()
    return model, optimizer, half_the_heads(model, model.gates)


def qwen2_step(layers: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer, UpdateMask]:
    """A Qwen2-style decoder (57M parameters with 8 layers) after one backward pass, its AdamW and a mask."""
    config = transformers.Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, optimizer, half_the_heads(model, UnitGates(model.model, "heads"))


def half_the_heads(model: torch.nn.Module, gates: UnitGates) -> UpdateMask:
    generator = torch.Generator().manual_seed(0)
    kept = torch.rand(gates.shape, generator=generator).argsort(dim=1) < gates.shape[1] // 2
    return UpdateMask(unit_parameter_masks(model, kept, gates))


def measure(build, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, optimizer, mask = build()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    masked = MaskedOptimizer(optimizer, model.named_parameters())
    general = MaskedOptimizer(optimizer, model.named_parameters())
    general.adam_in_place = False

    def restore():
        for parameter, grad in grads.items():
            parameter.grad.copy_(grad)

    variants = {
        "copy": restore,
        "bare": lambda: (restore(), optimizer.step()),
        "masked": lambda: (restore(), masked.step(update_mask=mask)),
        "general": lambda: (restore(), general.step(update_mask=mask)),
    }
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) - (0 if name == "copy" else statistics.median(times["copy"]))
              for name, t in times.items()}  # fmt: skip
    return {"bare_ms": median["bare"] * 1e3, "masked": median["masked"] / median["bare"],
            "general": median["general"] / median["bare"], "tensors": len(mask)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["e5", "qwen2"], choices=["e5", "qwen2"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(models=["qwen2"], rounds=2)
    print(
        f"{'model':<8} {'masked tensors':>14} {'bare AdamW ms':>14} {'masked / bare':>14} {'general / bare':>15}"
    )
    for name in args.models:
        build = {"e5": e5_step, "qwen2": lambda: qwen2_step(2 if args.smoke else 8)}[name]
        r = measure(build, args.rounds)
        print(
            f"{name:<8} {r['tensors']:>14} {r['bare_ms']:>14.1f} {r['masked']:>14.3f} {r['general']:>15.3f}"
        )
    print("goal: masked / bare <= 1.05")


if __name__ == "__main__":
    main()
