"""The Hugging Face wrapper's cost: forward and backward of ``AutoModelForTokenClassification``
unwrapped, wrapped with one language's subnetwork (gates ``[layers, heads]``), and wrapped with a
batch mixing four languages (per-example gates ``[batch, layers, heads]``), and the masked
optimizer step (``SubnetworkTrainer``'s) against a bare AdamW step.

Ratios compare median times of variants run in the same process on the same batches, rounds
interleaved (targets: wrapped one language <= 1.05, mixed <= 1.10 of the unwrapped pass).

Usage::

    python benchmarks/hf_wrapper.py                          # multilingual-e5-small (SUBNETS_E5_PATH)
    python benchmarks/hf_wrapper.py --model tiny --rounds 5
    python benchmarks/hf_wrapper.py --smoke                  # tiny, one round: does it run

Run it alone: timings on two cores are disturbed by any other job.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers
from shared_paths import e5_path

from subnets.hf import SubnetworkConfig, masked_optimizer, with_subnetworks
from subnets.masks import Subnetwork

LANGUAGES = ["de", "fr", "it", "ko"]


def base_model(name: str) -> torch.nn.Module:
    if name == "tiny":
        config = transformers.BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, num_labels=17)  # fmt: skip
        torch.manual_seed(0)
        return transformers.BertForTokenClassification(config)
    dtype = {"dtype" if transformers.__version__ >= "5" else "torch_dtype": torch.float32}
    return transformers.AutoModelForTokenClassification.from_pretrained(e5_path(), num_labels=17, **dtype)


def timed(calls: dict, rounds: int, repeats: int) -> dict[str, float]:
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["e5", "tiny"], default="e5")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(model="tiny", batch_size=4, length=16, rounds=1, repeats=1)

    plain = base_model(args.model).eval()  # no dropout: the variants compute the same kind of pass
    wrapped = with_subnetworks(copy.deepcopy(plain), SubnetworkConfig(units="heads", apply="both"))
    generator = torch.Generator().manual_seed(0)
    for code in LANGUAGES:  # half the heads of each layer, drawn per language
        scores = torch.rand(wrapped.gates.shape, generator=generator)
        wrapped.masks[code] = Subnetwork(scores >= scores.median(dim=1, keepdim=True).values)
    vocab = plain.config.vocab_size
    inputs = {"input_ids": torch.randint(5, min(vocab, 30000), (args.batch_size, args.length), generator=generator),
              "attention_mask": torch.ones(args.batch_size, args.length, dtype=torch.long),
              "labels": torch.randint(0, 17, (args.batch_size, args.length), generator=generator)}  # fmt: skip
    mixed = [LANGUAGES[i % len(LANGUAGES)] for i in range(args.batch_size)]

    def pass_of(model, **extra):
        def call():
            model.zero_grad(set_to_none=True)
            model(**inputs, **extra).loss.backward()

        return call

    passes = timed(
        {"unwrapped": pass_of(plain), "one language": pass_of(wrapped, language="de"),
         "mixed languages": pass_of(wrapped, language=mixed)},
        args.rounds, args.repeats,
    )  # fmt: skip

    pass_of(wrapped, language=mixed)()
    adamw = torch.optim.AdamW(wrapped.parameters(), lr=1e-9)
    masked = masked_optimizer(torch.optim.AdamW(wrapped.parameters(), lr=1e-9), wrapped)
    union = wrapped.update_mask(LANGUAGES[:2])
    masked.update_mask = union
    steps = timed(
        {"AdamW step": adamw.step, "masked step (2 languages)": masked.step}, args.rounds, args.repeats
    )

    print(
        f"model {args.model}, batch {args.batch_size} x {args.length} tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'forward + backward':32s} {'seconds':>9s} {'ratio':>7s}")
    for name, seconds in passes.items():
        print(f"{name:32s} {seconds:9.4f} {seconds / passes['unwrapped']:7.3f}")
    print(f"{'optimizer step':32s} {'seconds':>9s} {'ratio':>7s}")
    for name, seconds in steps.items():
        print(f"{name:32s} {seconds:9.4f} {seconds / steps['AdamW step']:7.3f}")


if __name__ == "__main__":
    main()
