"""MAML meta-step benchmark: subnets.meta.MAML (torch.func) against `higher` on the same episode.

For the tiny model and multilingual-e5-small, first and second order, it times one meta-step
(an episode of 2 languages with 8 support and 8 query sentences of real UD data, 1 inner SGD
step, an AdamW outer step) and reports the median seconds per step and the peak memory of a
process that runs only that variant (RSS on CPU, allocated memory on GPU).

`higher` (a dev dependency) monkeypatches modules into functional copies. On transformers 5
those copies lose the layer outputs that the model collects by module class, so `higher`
cannot run these encoders there: run this script with transformers 4 installed for the
comparison (the `higher` rows then say what it measured; on transformers 5 they say
"unsupported").

Usage::

    python benchmarks/meta_step.py                       # tiny and e5, both orders
    python benchmarks/meta_step.py --models tiny --steps 10
    python benchmarks/meta_step.py --smoke               # tiny, first order, 1 step, not higher: does it run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from shared_paths import e5_path, ud_root

from subnets.config import compose_config
from subnets.data.batching import Collator
from subnets.data.dataset import Batcher, load_language
from subnets.data.discovery import discover_languages
from subnets.meta import MAML, MetaTask
from subnets.models.build import build_encoder, build_model
from subnets.models.encoder import max_subwords
from subnets.tasks import Parsing
from subnets.training.update import parameter_groups

LANGUAGES = ["en_ewt", "ko_kaist"]
INNER_LR = {"encoder": 1e-3, "head": 1e-2}


def setup(model_name: str):
    treebanks = discover_languages(ud_root())
    data = [load_language(treebanks[code], "train", Parsing(), max_examples=64) for code in LANGUAGES]
    # the runner's default model settings (tiny), or multilingual-e5-small from $SUBNETS_E5_PATH; eager
    # attention (what higher needs for second order)
    model_settings = [] if model_name == "tiny" else ["model=e5_small", f"model.name_or_path={e5_path()}"]
    cfg = compose_config([*model_settings, "model.mix_dropout=0.0", "model.attn_implementation=eager"])
    transformer, tokenizer = build_encoder(
        cfg.model, seed=0, texts=[" ".join(s.forms) for d in data for s in d.examples]
    )
    for d in data:
        d.tokenize(tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(cfg.model, transformer, Parsing()).to(device)
    batcher = Batcher(Collator(tokenizer, max_subwords(transformer, tokenizer)), device)

    def batch(d, start):
        return batcher.of(d, range(start, start + 8))

    episodes = [[MetaTask(batch(d, 16 * i), batch(d, 16 * i + 8), d.code) for d in data] for i in range(4)]
    return model, episodes


def ours(model, first_order: bool):
    names = {n for n, _ in model.encoder_parameters()}
    maml = MAML(
        model,
        inner_lr=INNER_LR,
        first_order=first_order,
        group_of=lambda n: "encoder" if n in names else "head",
    )
    optimizer = torch.optim.AdamW(parameter_groups(model, 5e-5, 1e-3, 0.01))
    return lambda tasks: maml.meta_step(tasks, optimizer)


def with_higher(model, first_order: bool):
    import higher

    names = {n for n, _ in model.encoder_parameters()}
    encoder = [p for n, p in model.named_parameters() if n in names]
    head = [p for n, p in model.named_parameters() if n not in names]
    inner = torch.optim.SGD(
        [{"params": encoder, "lr": INNER_LR["encoder"]}, {"params": head, "lr": INNER_LR["head"]}]
    )
    optimizer = torch.optim.AdamW(parameter_groups(model, 5e-5, 1e-3, 0.01))

    def step(tasks):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for task in tasks:
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fmodel, diffopt):  # fmt: skip
                diffopt.step(fmodel(task.support).loss)
                query = fmodel(task.query).loss / len(tasks)
                if first_order:
                    grads = torch.autograd.grad(query, list(fmodel.parameters()), allow_unused=True)
                    for p, g in zip(model.parameters(), grads):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                else:
                    query.backward()
        optimizer.step()

    return step


def build_step(model_name: str, implementation: str, order: str):
    model, episodes = setup(model_name)
    step = (ours if implementation == "subnets" else with_higher)(model, order == "first")
    step(episodes[0])  # warm-up; raises if the variant cannot run
    return step, episodes


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory(model_name: str, implementation: str, order: str, steps: int) -> dict:
    """Peak memory of a process running only this variant, and its median seconds per step (a
    figure of its own; ``step_times`` times the two implementations alternating)."""
    try:
        step, episodes = build_step(model_name, implementation, order)
    except Exception as error:  # noqa: BLE001 (report why a variant cannot run)
        return {"error": f"{type(error).__name__}: {error}"[:160]}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(steps):
        sync()
        start = time.perf_counter()
        step(episodes[(i + 1) % len(episodes)])
        sync()
        seconds.append(time.perf_counter() - start)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_memory_mib": peak, "seconds_per_step": statistics.median(seconds)}


def step_times(model_name: str, order: str, steps: int) -> dict:
    """Median seconds per meta-step of both implementations, timed in one process, alternating."""
    variants = {}
    for implementation in ("subnets", "higher"):
        with contextlib.suppress(Exception):  # the memory run reports why a variant cannot run
            variants[implementation] = build_step(model_name, implementation, order)
    times = {name: [] for name in variants}
    for i in range(steps):
        for name, (step, episodes) in variants.items():
            sync()
            start = time.perf_counter()
            step(episodes[(i + 1) % len(episodes)])
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,e5")
    parser.add_argument("--orders", default="first,second")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)  # internal: model implementation order
    parser.add_argument("--times", nargs=2, help=argparse.SUPPRESS)  # internal: model order
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(models="tiny", orders="first", steps=1)
    implementations = ("subnets",) if args.smoke else ("subnets", "higher")
    if args.memory:
        print(json.dumps(peak_memory(*args.memory, args.steps)))
        return
    if args.times:
        print(json.dumps(step_times(*args.times, args.steps)))
        return
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")  # fmt: skip

    def child(*flags):
        command = [sys.executable, __file__, *flags, "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    for model in args.models.split(","):
        for order in args.orders.split(","):
            times = {} if args.smoke else child("--times", model, order)
            for implementation in implementations:
                row = {"model": model, "order": order, "implementation": implementation}
                row.update(child("--memory", model, implementation, order))
                if implementation in times:
                    row["seconds_per_step"] = times[implementation]
                rows.append(row)
    print("model | order | implementation | s/step | peak MiB | time / higher | memory / higher")
    for row in rows:
        if "error" in row:
            print(f"{row['model']} | {row['order']} | {row['implementation']} | unsupported: {row['error']}")
            continue
        other = next(
            (r for r in rows if (r["model"], r["order"]) == (row["model"], row["order"]) and r is not row),
            None,
        )
        comparable = row["implementation"] == "subnets" and other is not None and "error" not in other
        ratios = [
            f"{row[k] / other[k]:.3f}" if comparable else "" for k in ("seconds_per_step", "peak_memory_mib")
        ]
        print(f"{row['model']} | {row['order']} | {row['implementation']} | {row['seconds_per_step']:.3f} | "
              f"{row['peak_memory_mib']:.0f} | {ratios[0]} | {ratios[1]}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
