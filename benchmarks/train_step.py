"""Training-step benchmark on real UD batches: throughput, peak memory, and the cost of head gates.

For each model (the tiny random BERT and multilingual-e5-small) it trains on language-homogeneous
batches of real UD sentences and reports:

* throughput of the baseline step (forward, backward, clipping, AdamW) in words per second;
* peak memory of a process that runs those steps (RSS on CPU, allocated memory on GPU);
* the head-gate cost: a step with every gate at 1 against the same model without hooks,
  timed in the same run, blocks interleaved, as a ratio of median step times.

Usage::

    python benchmarks/train_step.py                      # tiny and e5, 20 timed steps each
    python benchmarks/train_step.py --models tiny --steps 50

Needs SUBNETS_UD_ROOT (default ../shared/data/ud) and SUBNETS_E5_PATH
(default ../shared/models/multilingual-e5-small).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from subnets.data.batching import Collator
from subnets.data.dataset import load_language
from subnets.data.ud import discover_treebanks
from subnets.models.encoder import (
    Encoder,
    build_tiny_transformer,
    load_pretrained,
    max_subwords,
    train_wordpiece_tokenizer,
)
from subnets.models.head_gates import HeadGates
from subnets.models.parser import DependencyParser
from subnets.training import parameter_groups, training_step

REPO = Path(__file__).resolve().parents[1]
UD_ROOT = Path(os.environ.get("SUBNETS_UD_ROOT", REPO.parent / "shared" / "data" / "ud"))
E5_PATH = os.environ.get("SUBNETS_E5_PATH", str(REPO.parent / "shared" / "models" / "multilingual-e5-small"))
LANGUAGES = ["en_ewt", "ko_kaist", "ar_pud", "cs_pud"]


def build(model_name: str, sentences_per_language: int):
    """Parser, optimizer and the real-UD language data for ``model_name`` (tiny | e5)."""
    treebanks = discover_treebanks(UD_ROOT)
    data = [
        load_language(treebanks[code], "train", max_sentences=sentences_per_language) for code in LANGUAGES
    ]
    if model_name == "tiny":
        texts = [" ".join(s.forms) for d in data for s in d.sentences]
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=2000, max_length=128)
        transformer = build_tiny_transformer(
            len(tokenizer), 128, 4, 4, 256, 128, pad_token_id=tokenizer.pad_token_id
        )
        arc_dim, label_dim = 256, 128
    else:
        transformer, tokenizer = load_pretrained(E5_PATH)
        arc_dim, label_dim = 256, 128
    for d in data:
        d.tokenize(tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DependencyParser(Encoder(transformer), "parsing", arc_dim, label_dim).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 5e-5, 1e-3, 0.01))
    return model, optimizer, Collator(tokenizer, max_subwords(transformer, tokenizer)), data, device


def batches(collator, data, batch_size: int, count: int, device):
    """``count`` language-homogeneous batches, cycling over the languages."""
    out = []
    for i in range(count):
        d = data[i % len(data)]
        start = (i // len(data)) * batch_size % max(1, len(d) - batch_size)
        idx = range(start, start + batch_size)
        out.append(collator([d.sentences[j] for j in idx], [d.pieces[j] for j in idx], d.code).to(device))
    return out


def timed(step, batch) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model_name: str, args) -> dict:
    torch.manual_seed(0)
    model, optimizer, collator, data, device = build(model_name, args.sentences)
    batch_list = batches(collator, data, args.batch_size, args.steps, device)
    words = sum(b.num_words for b in batch_list)

    def baseline(batch):
        training_step(model, batch, optimizer, clip_norm=5.0)

    def gates_at_one(batch):
        training_step(
            model, batch, optimizer, gates=torch.ones(model.gates.shape, device=device), clip_norm=5.0
        )

    for b in batch_list[: args.warmup]:
        baseline(b)
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

    # Head gates at 1 versus the same model with its hooks removed, rounds interleaved.
    times = {"gates_at_1": [], "no_hooks": []}
    for _ in range(args.rounds):
        times["gates_at_1"] += [timed(gates_at_one, b) for b in batch_list]
        model.gates.remove()
        times["no_hooks"] += [timed(baseline, b) for b in batch_list]
        model.encoder.gates = HeadGates(model.encoder.transformer)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": model_name,
        "device": str(device),
        "batch_size": args.batch_size,
        "words_per_step": words / len(batch_list),
        "words_per_second": words / seconds,
        "seconds_per_step": seconds / len(batch_list),
        "peak_memory_mib": peak,
        "memory_before_steps_mib": rss_before,
        "gate_cost_ratio": median["gates_at_1"] / median["no_hooks"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,e5")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (distinct batches)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the ratios")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=200, help="sentences read per language")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for name in args.models.split(","):
        # one process per model, so that peak memory is that model's alone
        command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"{'model':6} {'device':6} {'words/step':>10} {'words/s':>9} {'s/step':>7} {'peak MiB':>9} {'gates@1 / no hooks':>19}"
    )
    for r in rows:
        print(
            f"{r['model']:6} {r['device']:6} {r['words_per_step']:10.0f} {r['words_per_second']:9.0f} "
            f"{r['seconds_per_step']:7.3f} {r['peak_memory_mib']:9.0f} {r['gate_cost_ratio']:19.3f}"
        )


if __name__ == "__main__":
    main()
