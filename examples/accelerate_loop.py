"""Language subnetworks in an ``accelerate`` training loop of your own, with mixed-language batches.

Two synthetic languages tag the same tokens differently (a token's tag is ``(token + shift) mod 3``,
``shift`` per language); a small BERT token classifier learns both through per-language head
subnetworks. Each batch mixes the languages: every example runs through its own language's heads,
and the masked optimizer updates only the heads of the languages in the step (over all processes)::

    accelerate launch --cpu --num_processes 2 examples/accelerate_loop.py --steps 60
    python examples/accelerate_loop.py --steps 60          # one process

The loop is an ordinary accelerate loop; subnets adds three calls: ``language=`` in the forward,
``before_optimizer_step`` (gathers the step's languages, masks the gradients, sets the optimizer's
update mask) and ``after_optimizer_step``. It prints each language's accuracy, and a checksum of
the weights (the same on every process) and of the weights no language owns (unchanged). With
``--out FOLDER`` each process also writes its own results to ``FOLDER/process-<rank>.json`` (the
processes' printed lines share one terminal and may interleave).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from torch.utils.data import DataLoader

from subnets.hf import SubnetworkConfig, find_subnetworks, masked_optimizer, with_subnetworks
from subnets.hf.trainer import LanguageCollator
from subnets.masks import unit_parameter_masks

SHIFTS = {"de": 0, "fr": 1}
VOCAB, LENGTH = 40, 8


def language_data(code: str, n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, LENGTH), generator=generator)
    labels = (ids + SHIFTS[code]) % 3
    return [{"input_ids": i, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": t, "language": code}
            for i, t in zip(ids, labels)]  # fmt: skip


def accuracy(model, examples: list[dict], code: str) -> float:
    inputs = torch.stack([e["input_ids"] for e in examples])
    labels = torch.stack([e["labels"] for e in examples])
    with torch.no_grad(), model.language(code):
        predicted = model(input_ids=inputs).logits.argmax(-1)
    return float((predicted == labels).float().mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, help="a folder for each process's results as JSON")
    arguments = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    transformers.set_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=32)  # fmt: skip
    # apply="both": the two languages' tags conflict, so each runs through its own heads (the
    # default, "gradient", restricts only what a language's steps update)
    subnetworks = SubnetworkConfig(units="heads", keep_ratio=0.5, apply="both")
    model = with_subnetworks(transformers.BertForTokenClassification(config), subnetworks)
    train = {code: language_data(code, 128, seed) for seed, code in enumerate(SHIFTS)}
    test = {code: language_data(code, 64, 10 + seed) for seed, code in enumerate(SHIFTS)}
    collate = LanguageCollator(transformers.default_data_collator)
    # every process finds the same masks: the same model, the same data
    find_subnetworks(
        model, {code: examples[:32] for code, examples in train.items()}, collate_fn=collate.collator
    )
    union = model.masks["de"].unit_mask | model.masks["fr"].unit_mask
    unowned = {name: ~mask for name, mask in unit_parameter_masks(model, union).items()}
    start = {name: p.detach().clone() for name, p in model.named_parameters() if name in unowned}

    mixed = [example for pair in zip(train["de"], train["fr"]) for example in pair]
    loader = DataLoader(mixed, batch_size=arguments.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    optimizer = masked_optimizer(
        torch.optim.AdamW(model.parameters(), lr=arguments.lr, weight_decay=0.1), model
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    subnetworks = accelerator.unwrap_model(model)

    step, losses = 0, []
    while step < arguments.steps:
        for batch in loader:
            loss = model(**batch).loss  # batch["language"]: each example's code
            accelerator.backward(loss)
            subnetworks.before_optimizer_step(optimizer)
            accelerator.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            subnetworks.after_optimizer_step()
            optimizer.zero_grad()
            losses.append(float(accelerator.reduce(loss.detach(), "mean")))
            step += 1
            if step == arguments.steps:
                break

    subnetworks.eval()
    named = dict(subnetworks.named_parameters())
    unchanged = all(torch.equal(named[n][m], start[n][m]) for n, m in unowned.items())
    checksum = sum(float(p.detach().double().sum()) for p in subnetworks.parameters())
    print(f"process {accelerator.process_index}: weights checksum {checksum:.10f}; "
          f"weights outside every subnetwork unchanged: {unchanged}", flush=True)  # fmt: skip
    accelerator.wait_for_everyone()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    accuracies = {code: accuracy(subnetworks, examples, code) for code, examples in test.items()}
    if accelerator.is_main_process:
        print(f"processes {accelerator.num_processes}, steps {step}: loss {first:.3f} -> {last:.3f}")
        for code, value in accuracies.items():
            print(f"{code}: accuracy {value:.1f}")
    if arguments.out:
        results = {"process": accelerator.process_index, "processes": accelerator.num_processes, "steps": step,
                   "checksum": checksum, "unowned_unchanged": unchanged, "loss": [first, last],
                   "accuracy": accuracies}  # fmt: skip
        arguments.out.mkdir(parents=True, exist_ok=True)
        path = arguments.out / f"process-{accelerator.process_index}.json"
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
