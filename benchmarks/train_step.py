"""Training-step benchmark on real UD batches: throughput, peak memory, and the cost of unit gates.

For each model (the tiny random BERT and multilingual-e5-small) it trains on language-homogeneous
batches of real UD sentences and reports:

* throughput of the baseline step (forward, backward, clipping, AdamW) in words per second;
* peak memory of a process that runs those steps (RSS on CPU, allocated memory on GPU);
* the head-gate cost: a step with every gate at 1 against the same model without hooks;
* the masked training step (exact update restricted to half the heads, ``method.apply=gradient``)
  against the baseline step on the same model and batches;
* the masked optimizer step against the bare AdamW step on the same gradients;
* the dynamic steps (rule ema: differentiable gates and the moving average; rule learned:
  sampled hard-concrete gates, sparsity penalty, gate-logit update) against the static step;
* unit importance on one batch (heads; feed-forward neurons; both kinds at once) against one
  forward and backward pass;
* the baseline step under bfloat16 autocast (``train.precision=bf16``), with frozen word
  embeddings (``model.freeze_embeddings=true``) and with a compiled encoder
  (``train.compile=true``; a copy of the model with its own AdamW, compiled and warmed up on
  every batch before timing, its compile time reported) against the baseline step.

Ratios compare median times of variants run in the same process, rounds interleaved.

Usage::

    python benchmarks/train_step.py                      # tiny and e5, 20 timed steps each
    python benchmarks/train_step.py --models tiny --steps 50
    python benchmarks/train_step.py --smoke              # seconds: does it run (figures mean nothing)

Needs SUBNETS_UD_ROOT (default ../shared/data/ud) and SUBNETS_E5_PATH
(default ../shared/models/multilingual-e5-small).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from shared_paths import e5_path, ud_root

from subnets.config import compose_config
from subnets.data.batching import Collator
from subnets.data.dataset import Batcher, load_language
from subnets.data.discovery import discover_languages
from subnets.masks.dynamic import HardConcreteGates, ImportanceEMA
from subnets.masks.importance import unit_importance
from subnets.masks.subnetwork import unit_parameter_masks
from subnets.models.build import build_encoder, build_model
from subnets.models.encoder import max_subwords
from subnets.models.gates import HeadGates, NeuronGates, UnitGates
from subnets.optim.masked import MaskedOptimizer
from subnets.tasks import Parsing
from subnets.training.update import parameter_groups, training_step

LANGUAGES = ["en_ewt", "ko_kaist", "ar_pud", "cs_pud"]


def build(model_name: str, sentences_per_language: int):
    """Parser, optimizer and the real-UD language data for ``model_name`` (tiny | e5)."""
    treebanks = discover_languages(ud_root())
    data = [
        load_language(treebanks[code], "train", Parsing(), max_examples=sentences_per_language)
        for code in LANGUAGES
    ]
    # the runner's default model settings (tiny), or multilingual-e5-small from $SUBNETS_E5_PATH
    model_settings = [] if model_name == "tiny" else ["model=e5_small", f"model.name_or_path={e5_path()}"]
    cfg = compose_config([*model_settings, "model.mix_dropout=0.0"])
    texts = [" ".join(s.forms) for d in data for s in d.examples]
    transformer, tokenizer = build_encoder(cfg.model, seed=0, texts=texts)
    for d in data:
        d.tokenize(tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg.model, transformer, Parsing()).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 5e-5, 1e-3, 0.01))
    return model, optimizer, Collator(tokenizer, max_subwords(transformer, tokenizer)), data, device


def batches(collator, data, batch_size: int, count: int, device):
    """``count`` language-homogeneous batches, cycling over the languages."""
    batcher, out = Batcher(collator, device), []
    for i in range(count):
        d = data[i % len(data)]
        start = (i // len(data)) * batch_size % max(1, len(d) - batch_size)
        out.append(batcher.of(d, range(start, start + batch_size)))
    return out


def timed(step, batch) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(variants: dict, inputs, rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant over ``inputs``, rounds interleaved."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            times[name] += [timed(call, x) for x in inputs]
    return {name: statistics.median(t) for name, t in times.items()}


def measure(model_name: str, args) -> dict:
    torch.manual_seed(0)
    model, optimizer, collator, data, device = build(model_name, args.sentences)
    masked_optimizer = MaskedOptimizer(optimizer, model.named_parameters())
    batch_list = batches(collator, data, args.batch_size, args.steps, device)
    words = sum(b.num_words for b in batch_list)
    generator = torch.Generator().manual_seed(0)
    unit_mask = torch.rand(model.gates.shape, generator=generator).argsort(dim=1) < model.gates.num_heads // 2
    update_mask = unit_parameter_masks(model, unit_mask.to(device))

    def baseline(batch):
        training_step(model, batch, optimizer, clip_norm=5.0)

    def gates_at_one(batch):
        training_step(
            model, batch, optimizer, gates=torch.ones(model.gates.shape, device=device), clip_norm=5.0
        )

    def masked_step(batch):
        training_step(model, batch, masked_optimizer, update_mask=update_mask, clip_norm=5.0)

    ema = ImportanceEMA(model.gates.shape, 0.9)

    def dynamic_ema_step(batch):  # the masked step with differentiable gates, then the average
        result = training_step(
            model, batch, masked_optimizer, update_mask=update_mask, clip_norm=5.0, track_gates=True
        )
        ema.update(batch.lang, result.gate_grads[batch.lang])

    embeddings = model.encoder.transformer.get_input_embeddings().weight

    def bf16_step(batch):  # train.precision=bf16
        model.encoder.autocast = torch.bfloat16
        baseline(batch)
        model.encoder.autocast = None

    def frozen_embeddings_step(batch):  # model.freeze_embeddings=true: no gradient, no update
        embeddings.requires_grad_(False)
        baseline(batch)
        embeddings.requires_grad_(True)

    learned = HardConcreteGates(LANGUAGES, model.gates.shape).to(device)
    gate_optimizer = torch.optim.Adam(learned.parameters(), lr=0.05)

    def dynamic_learned_step(batch):  # sampled hard-concrete gates, sparsity penalty, gate update
        gate_optimizer.zero_grad(set_to_none=True)
        training_step(
            model, batch, masked_optimizer, gates=learned.sample(batch.lang), update_mask=update_mask,
            clip_norm=5.0, extra_loss=lambda: learned.sparsity_penalty(batch.lang, 0.5),
        )  # fmt: skip
        gate_optimizer.step()

    variants = {"baseline": baseline, "masked": masked_step, "ema": dynamic_ema_step, "learned": dynamic_learned_step,
                "bf16": bf16_step, "frozen_embeddings": frozen_embeddings_step}  # fmt: skip
    compile_seconds = None
    if not args.smoke:  # compiling takes minutes on a CPU
        compiled = copy.deepcopy(model)
        compiled.encoder.transformer.compile()  # as train.compile=true does
        compiled_optimizer = torch.optim.AdamW(parameter_groups(compiled, 5e-5, 1e-3, 0.01))

        def compiled_step(batch):
            training_step(compiled, batch, compiled_optimizer, clip_norm=5.0)

        start = time.perf_counter()
        for b in batch_list:  # compiled for every batch shape before timing
            compiled_step(b)
        compile_seconds = time.perf_counter() - start
        variants["compiled"] = compiled_step

    for b in batch_list[: args.warmup]:
        baseline(b)
        masked_step(b)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in batch_list:
        baseline(b)
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )

    # The masked training step (exact update of half the heads: a static step) against the
    # baseline step, and the dynamic steps (ema and learned rules) against the static step.
    steps = interleaved(variants, batch_list, args.rounds)

    # The optimizer step alone, with and without the mask, on the same gradients.
    model.zero_grad()
    model(batch_list[0]).loss.backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}

    def restore_grads(_=None):
        for p, g in grads.items():
            p.grad.copy_(g)

    optimizer_steps = interleaved(
        {
            "bare": lambda _: (restore_grads(), optimizer.step()),
            "masked": lambda _: (restore_grads(), masked_optimizer.step(update_mask=update_mask)),
            "copy_only": restore_grads,
        },
        range(args.steps),
        args.rounds,
    )

    # Head importance on one batch against one forward and backward pass (both in eval mode).
    def forward_backward(batch):
        model.eval()
        model.zero_grad()
        model(batch).loss.backward()
        model.train()

    neurons, both = NeuronGates(model.encoder.transformer), UnitGates(model.encoder.transformer, "both")
    scoring = interleaved(
        {
            "forward_backward": forward_backward,
            "importance": lambda b: unit_importance(model, [b]),
            "neuron_importance": lambda b: unit_importance(model, [b], gates=neurons),
            "both_importance": lambda b: unit_importance(model, [b], gates=both),
        },
        batch_list,
        args.rounds,
    )
    neurons.remove()
    both.remove()

    # Head gates at 1 versus the same model with its hooks removed, rounds interleaved.
    gate_times = {"gates_at_1": [], "no_hooks": []}
    for _ in range(args.rounds):
        gate_times["gates_at_1"] += [timed(gates_at_one, b) for b in batch_list]
        model.gates.remove()
        gate_times["no_hooks"] += [timed(baseline, b) for b in batch_list]
        model.encoder.gates = HeadGates(model.encoder.transformer)
    gates = {name: statistics.median(t) for name, t in gate_times.items()}
    bare = optimizer_steps["bare"] - optimizer_steps["copy_only"]
    masked = optimizer_steps["masked"] - optimizer_steps["copy_only"]
    return {
        "model": model_name,
        "device": str(device),
        "batch_size": args.batch_size,
        "words_per_step": words / len(batch_list),
        "words_per_second": words / seconds,
        "seconds_per_step": seconds / len(batch_list),
        "peak_memory_mib": peak,
        "memory_before_steps_mib": rss_before,
        "gate_cost_ratio": gates["gates_at_1"] / gates["no_hooks"],
        "masked_step_ratio": steps["masked"] / steps["baseline"],
        "dynamic_ema_ratio": steps["ema"] / steps["masked"],
        "dynamic_learned_ratio": steps["learned"] / steps["masked"],
        "optimizer_step_seconds": bare,
        "masked_optimizer_ratio": masked / bare,
        "importance_ratio": scoring["importance"] / scoring["forward_backward"],
        "neuron_importance_ratio": scoring["neuron_importance"] / scoring["forward_backward"],
        "both_importance_ratio": scoring["both_importance"] / scoring["forward_backward"],
        "bf16_ratio": steps["bf16"] / steps["baseline"],
        "frozen_embeddings_ratio": steps["frozen_embeddings"] / steps["baseline"],
        "compiled_ratio": steps["compiled"] / steps["baseline"] if "compiled" in steps else None,
        "compile_warmup_seconds": compile_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,e5")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (distinct batches)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the ratios")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=200, help="sentences read per language")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest setting (tiny, 2 steps of 4 sentences, no compiled step): does it run")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(models="tiny", steps=2, warmup=1, rounds=1, batch_size=4, sentences=16)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for name in args.models.split(","):
        # one process per model, so that peak memory is that model's alone
        command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    figures = [  # (name, key, format, target)
        ("words per step", "words_per_step", "{:.0f}", ""), ("words per second", "words_per_second", "{:.0f}", ""),
        ("seconds per baseline step", "seconds_per_step", "{:.3f}", ""),
        ("peak memory MiB", "peak_memory_mib", "{:.0f}", ""),
        ("gates at 1 / no hooks", "gate_cost_ratio", "{:.3f}", "<= 1.05"),
        ("masked (static) step / baseline step", "masked_step_ratio", "{:.3f}", "<= 1.05"),
        ("masked optimizer step / bare AdamW step", "masked_optimizer_ratio", "{:.3f}", "<= 1.05"),
        ("dynamic ema step / static step", "dynamic_ema_ratio", "{:.3f}", "<= 1.05"),
        ("dynamic learned step / static step", "dynamic_learned_ratio", "{:.3f}", ""),
        ("head importance / forward+backward", "importance_ratio", "{:.3f}", "<= 1.2"),
        ("neuron importance / forward+backward", "neuron_importance_ratio", "{:.3f}", "<= 1.2"),
        ("head+neuron importance / forward+backward", "both_importance_ratio", "{:.3f}", "<= 1.2"),
        ("bf16 step / fp32 step", "bf16_ratio", "{:.3f}", ""),
        ("frozen-embedding step / baseline step", "frozen_embeddings_ratio", "{:.3f}", ""),
        ("compiled step / baseline step", "compiled_ratio", "{:.3f}", ""),
        ("compile + first steps, seconds", "compile_warmup_seconds", "{:.1f}", ""),
    ]  # fmt: skip
    for r in rows:
        for name, key, fmt, target in figures:
            value = "skipped" if r[key] is None else fmt.format(r[key])
            print(f"{r['model']:5s} {r['device']:5s} {name:42s} {value:>8s}  {target}".rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
