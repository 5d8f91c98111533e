"""Memory and time of training a subnetwork alone (``masks.train=subnetwork``) against LoRA and full
fine-tuning, on the same batches.

For each model, three ways of training it, each a plain fp32 ``torch.optim.AdamW`` step (forward,
backward, step) on the same batches:

* ``subnetwork``: :func:`~subnets.masks.compact.train_subnetworks_only` with one static random
  subnetwork of ``--share`` of the heads and ``--share`` of the feed-forward neurons (drawn over
  all layers, at least one of each; ``--units heads`` or ``neurons`` for one kind only): the
  transformer frozen, a ``subnetwork_values`` tensor for the owned rows or columns of each
  projection;
* ``lora``: LoRA (peft) on every projection the units own (query, key, value and attention
  output; feed-forward input and output projections), the rank chosen so that LoRA trains as
  many parameters as the subnetwork, as near as a whole rank comes;
* ``shira``: SHiRA (peft's sparse high-rank adapter, a random mask) on the same projections at
  LoRA's rank, so the same count;
* ``full``: full fine-tuning (every parameter).

The models: a Qwen2-style decoder with the geometry of Qwen2-0.5B (24 layers, hidden 896, 14
query and 2 key-value heads, 4864 neurons, tied embeddings) but random weights and the
vocabulary shrunk from 151936 to 32000 (to save memory; the causal LM loss); and
multilingual-e5-small from ``$SUBNETS_E5_PATH`` (skipped, saying which variable to set, where
absent; no task head: the loss is the mean square of the last hidden states, so every trainable
parameter is the method's own). Each method runs in a fresh process of its own, which reports

* the bytes of trainable values, their gradients and the AdamW state after a step, counted from
  the tensors' storages (each storage once), and their ratio to 16 bytes x the trainable count;
* the peak memory of a training step: the growth of the process's resident memory (``VmHWM``,
  reset before the step, minus ``VmRSS`` before it) over one step from a fresh optimizer and no
  gradients (so the gradients, the AdamW state and the activations are in it), after the warm-up
  and timed steps, with glibc told to map every allocation above 64 KiB on its own (so freed
  memory leaves the process and the resident size follows the live tensors);
* the median time of its ``--steps`` timed steps (after ``--warmup`` steps).

The process of each method runs alone, one after another, so its times come from a different
process than LoRA's; the goal's time ratio comes from one more process that holds a subnetwork
copy and a LoRA copy of the model and times them on the same batches, rounds interleaved.

Then it prints the memory computed (not measured) for the Qwen2-7B and Llama-3.1-8B layouts (their
public configs) on one 80 GB GPU at ``--share`` of the units, activations excluded.

Usage::

    python benchmarks/subnetwork_memory.py                   # qwen2 and e5, 1% of the units
    python benchmarks/subnetwork_memory.py --models qwen2 --share 0.05 --steps 5
    python benchmarks/subnetwork_memory.py --models e5 --units neurons --share 0.25 --batch-size 16  # the efficient study's budget
    python benchmarks/subnetwork_memory.py --smoke           # a tiny decoder and encoder: does it run

Run it alone: timings on two cores are disturbed by any other job.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from shared_paths import E5_PATH
from torch import nn

from subnets.masks.compact import train_subnetworks_only, trainable_state_bytes
from subnets.masks.subnetwork import Subnetwork
from subnets.models.gates import UnitGates

QWEN2 = dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
             tie_word_embeddings=True)  # fmt: skip
QWEN2_SMOKE = {**QWEN2, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
E5_SMOKE = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128)  # fmt: skip
# Published layouts (their config.json), built on the meta device to count parameters and units.
ESTIMATED = {
    "Qwen2-7B": (transformers.Qwen2Config,
                 dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "Llama-3.1-8B": (transformers.LlamaConfig,
                     dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
}  # fmt: skip
METHODS = ("subnetwork", "lora", "shira", "full")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


# ---------------------------------------------------------------- models, subnetworks, methods


def build(name: str, smoke: bool):
    """``(model, transformer, loss, description)``: the model to train, its transformer (what the
    units live in and what is frozen) and ``loss(model, input_ids)``."""
    torch.manual_seed(0)
    if name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**(QWEN2_SMOKE if smoke else QWEN2)))
        what = "tiny Qwen2-style decoder" if smoke else "Qwen2-0.5B geometry, vocabulary 32000 (not 151936)"
        return model, model.model, lambda m, ids: m(input_ids=ids, labels=ids).loss, f"{what}, random weights"
    if smoke:
        model = transformers.BertModel(transformers.BertConfig(**E5_SMOKE))
        what = "tiny BERT encoder, random weights"
    else:
        model = transformers.AutoModel.from_pretrained(E5_PATH, dtype=torch.float32)
        what = "multilingual-e5-small"

    def loss(m, ids):
        return m(input_ids=ids).last_hidden_state.square().mean()

    return model, model, loss, what


def batches(model: nn.Module, count: int, batch_size: int, length: int) -> list[torch.Tensor]:
    """``count`` batches of random token ids (the same for every method: a fixed seed)."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    return [torch.randint(5, vocab, (batch_size, length), generator=generator) for _ in range(count)]


def random_subnetwork(gates: UnitGates, share: float) -> Subnetwork:
    """``share`` of each kind of unit (at least one), drawn at random over all layers."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(gates.shape, dtype=torch.bool)
    for kind, count in gates.units.items():
        total = gates.num_layers * count
        kept = torch.zeros(total, dtype=torch.bool)
        kept[torch.randperm(total, generator=generator)[: max(1, round(share * total))]] = True
        mask[:, gates.columns[kind]] = kept.view(gates.num_layers, count)
    return Subnetwork(mask)


def projections(transformer: nn.Module, gates: UnitGates) -> dict[str, nn.Module]:
    """The modules (by name) whose weight some unit owns: what the subnetwork and LoRA train."""
    owned = {id(o.parameter) for o in gates.owned}
    return {name: m for name, m in transformer.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) in owned}  # fmt: skip


def subnetwork_count(gates: UnitGates, unit_mask: torch.Tensor, modules: dict[str, nn.Module]) -> int:
    """The parameters ``train_subnetworks_only`` trains for ``unit_mask``: the owned rows (or
    columns) of the projection weights that its units own, each once (biases are shared)."""
    weights = {id(m.weight) for m in modules.values()}
    kept: dict[int, tuple[nn.Parameter, int, torch.Tensor]] = {}
    for owned in gates.owned:
        if id(owned.parameter) in weights:
            p = owned.parameter
            entry = kept.setdefault(id(p), (p, owned.dim, torch.zeros(p.shape[owned.dim], dtype=torch.bool)))
            entry[2].logical_or_(unit_mask[owned.layer][owned.owners].any(dim=1))
    return sum(int(k.sum()) * (p.numel() // p.shape[dim]) for p, dim, k in kept.values())


def lora_rank(count: int, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """The rank whose LoRA count (``rank x (in + out)`` over ``modules``) is nearest ``count``,
    and the parameters one rank adds."""
    per_rank = sum(sum(m.weight.shape) for m in modules.values())
    return max(1, round(count / per_rank)), per_rank


def prepare(name: str, method: str, args):
    """The model of ``name`` set up for ``method``: ``(model, trainable parameters, loss, facts)``."""
    import peft

    model, transformer, loss, what = build(name, args.smoke)
    gates = UnitGates(transformer, args.units)
    subnetwork = random_subnetwork(gates, args.share)
    modules = projections(transformer, gates)
    count = subnetwork_count(gates, subnetwork.unit_mask, modules)
    rank, per_rank = lora_rank(count, modules)
    facts = dict(description=what, layers=gates.num_layers, units=dict(gates.units),
                 kept={k: int(subnetwork.unit_mask[:, c].sum()) for k, c in gates.columns.items()},
                 parameters=sum(p.numel() for p in model.parameters()), subnetwork_count=count,
                 rank=rank, lora_count=rank * per_rank, projections=len(modules))  # fmt: skip
    if method == "subnetwork":
        trained = train_subnetworks_only(model, [subnetwork], transformer, gates=gates)
        assert trained.numel() == count, (trained.numel(), count)
    elif method == "lora":
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(modules),
                                 bias="none")  # fmt: skip
        model = peft.get_peft_model(model, config)
    elif method == "shira":
        model = peft.get_peft_model(
            model, peft.ShiraConfig(r=rank, target_modules=list(modules), random_seed=0)
        )
    gates.remove()  # the gates are only for finding the units; none of the methods gates them
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], loss, facts


def adamw(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.01)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, loss, ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss(model, ids).backward()
    optimizer.step()


def held_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the trainable values, gradients and AdamW state, from the tensors' storages
    (each storage once; Adam's scalar step counters included)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    state = [t for p in params for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
    return {"values": size(params), "gradients": size(p.grad for p in params if p.grad is not None),
            "optimizer": size(state), "count": sum(p.numel() for p in params)}  # fmt: skip


# ---------------------------------------------------------------- the processes


def status(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def map_large_allocations() -> bool:
    """Have glibc map each allocation above 64 KiB on its own and return freed memory at once,
    so that the resident size follows the live tensors; False where this is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 65536) and libc.mallopt(M_TRIM_THRESHOLD, 65536)
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def peak_growth(run) -> int:
    """Bytes by which ``run()`` raised the resident size above its size before (the peak resets)."""
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    run()
    return status("VmHWM") - before


def method_worker(name: str, method: str, args) -> dict:
    """One method of one model in this process: timed steps, then the memory of one more step."""
    model, parameters, loss, facts = prepare(name, method, args)
    data = batches(model, args.warmup + args.steps + 1, args.batch_size, args.length)
    optimizer = adamw(parameters)
    for ids in data[: args.warmup]:
        step(model, optimizer, loss, ids)
    times = []
    for ids in data[args.warmup : -1]:
        start = time.perf_counter()
        step(model, optimizer, loss, ids)
        times.append(time.perf_counter() - start)
    for p in parameters:  # from nothing: a fresh optimizer, no gradients
        p.grad = None
    optimizer = adamw(parameters)
    mapped = map_large_allocations()
    growth = peak_growth(lambda: step(model, optimizer, loss, data[-1]))
    result = facts | held_bytes(optimizer) | dict(seconds=statistics.median(times), growth=growth, mapped=mapped,
                                                  peak_rss=status("VmHWM"))  # fmt: skip
    if method == "subnetwork":  # the library's own count agrees with the storages'
        result["library_bytes"] = sum(trainable_state_bytes(optimizer).values())
    return result


def timing_worker(name: str, args) -> dict:
    """The subnetwork's and LoRA's steps on the same batches in one process, rounds interleaved."""
    variants = {}
    for method in ("subnetwork", "lora"):
        model, parameters, loss, _ = prepare(name, method, args)
        variants[method] = (model, adamw(parameters), loss)
    data = batches(variants["lora"][0], args.warmup + args.steps, args.batch_size, args.length)
    times = {method: [] for method in variants}
    for ids in data[: args.warmup]:
        for model, optimizer, loss in variants.values():
            step(model, optimizer, loss, ids)
    for i in range(args.rounds):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for method in order:
            model, optimizer, loss = variants[method]
            for ids in data[args.warmup :]:
                start = time.perf_counter()
                step(model, optimizer, loss, ids)
                times[method].append(time.perf_counter() - start)
    return {method: statistics.median(t) for method, t in times.items()}


def run_job(job: str, args) -> dict:
    """``job`` (``model:method`` or ``model:timing``) in this process: its report."""
    name, what = job.split(":")
    return timing_worker(name, args) if what == "timing" else method_worker(name, what, args)


def spawn(job: str, args) -> dict:
    """Run ``job`` in a fresh process, so that its memory is its own: its JSON report. A smoke run
    (``--smoke``) runs it in this process instead: it checks that every part runs, not the figures,
    and spares ten interpreters."""
    if args.smoke:
        return run_job(job, args)
    command = [sys.executable, __file__, "--worker", job, "--share", str(args.share), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--rounds", str(args.rounds), "--batch-size", str(args.batch_size),
               "--length", str(args.length), "--units", args.units]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the report


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def goal(name: str, what: str, value: float, met: bool) -> None:
    print(f"goal {name}: {what}: {value:.3f} {'PASS' if met else 'MISS'}")


def report(name: str, args) -> None:
    results = {method: spawn(f"{name}:{method}", args) for method in ("lora", "subnetwork", "shira", "full")}
    timing = spawn(f"{name}:timing", args)
    facts = results["subnetwork"]
    kept = ", ".join(f"{facts['kept'][k]} of {facts['layers'] * n} {k}" for k, n in facts["units"].items())
    print(f"\n{name}: {facts['description']}, {facts['parameters'] / 1e6:.1f}M parameters, {facts['layers']} layers; "
          f"batches of {args.batch_size} x {args.length} tokens")  # fmt: skip
    print(f"  subnetwork: {kept} ({args.share:.1%}), {facts['subnetwork_count']:,} parameters; LoRA rank "
          f"{facts['rank']} on {facts['projections']} projections, {facts['lora_count']:,} parameters "
          f"({ratio(facts['lora_count'], facts['subnetwork_count']):.3f} of the subnetwork's)")  # fmt: skip
    if not facts["mapped"]:
        print("  (not glibc: freed memory may stay resident, so the peaks below are less exact)")
    print(f"{'model':<6} {'method':<10} {'trainable':>11} {'values MB':>10} {'grads MB':>9} {'AdamW MB':>9} "
          f"{'/ (16 B n)':>10} {'step peak MB':>12} {'/ lora':>7} {'s/step':>7} {'/ lora':>7}")  # fmt: skip
    lora = results["lora"]
    for method in METHODS:
        r = results[method]
        state = r["values"] + r["gradients"] + r["optimizer"]
        print(f"{name:<6} {method:<10} {r['count']:>11} {r['values'] / 1e6:>10.2f} {r['gradients'] / 1e6:>9.2f} "
              f"{r['optimizer'] / 1e6:>9.2f} {ratio(state, 16 * r['count']):>10.3f} {r['growth'] / 2**20:>12.1f} "
              f"{ratio(r['growth'], lora['growth']):>7.3f} {r['seconds']:>7.3f} "
              f"{ratio(r['seconds'], lora['seconds']):>7.3f}")  # fmt: skip
    sub = results["subnetwork"]
    state = sub["values"] + sub["gradients"] + sub["optimizer"]
    assert sub["library_bytes"] == state, (sub["library_bytes"], state)
    interleaved = ratio(timing["subnetwork"], timing["lora"])
    print(f"  step peak: resident-memory growth over one step from no gradients and no AdamW state; s/step: median of "
          f"{args.steps} step(s), each method in its own process; interleaved in one process ({args.rounds} "
          f"round(s) of {args.steps} step(s)): subnetwork {timing['subnetwork']:.3f} s, LoRA {timing['lora']:.3f} s")  # fmt: skip
    goal(name, "subnetwork trainable state / (16 B x trainable count), within 5%", ratio(state, 16 * sub["count"]),
         abs(state / (16 * sub["count"]) - 1) <= 0.05)  # fmt: skip
    growth = ratio(sub["growth"], lora["growth"])
    goal(name, "subnetwork step peak memory / LoRA's, <= 1.1", growth, growth <= 1.1)
    goal(name, "subnetwork step time / LoRA's (interleaved), <= 1.05", interleaved, interleaved <= 1.05)


def estimate(share: float, units: str, gpu_gb: float = 80.0) -> None:
    """Memory computed for the published layouts (not measured), activations excluded."""
    kinds = "of the heads and of the neurons" if units == "both" else f"of the {units}"
    print(f"\nComputed, not measured: one {gpu_gb:.0f} GB GPU, {share:.1%} {kinds} (drawn as "
          "above), activations excluded. Frozen weights bf16 (2 B a parameter; fp32: 4 B) for subnetwork and LoRA; "
          "trainable parameters 16 B each (fp32 value, gradient and two AdamW moments); full fine-tuning 16 B a "
          "parameter (bf16 weights and gradients, fp32 master copy and moments; the same as all fp32)")  # fmt: skip
    print(f"{'layout':<13} {'method':<10} {'parameters':>11} {'trainable':>11} {'GB (bf16 frozen)':>17} "
          f"{'GB (fp32 frozen)':>17} {'fits (bf16 / fp32)':>19}")  # fmt: skip
    for name, (config_class, values) in ESTIMATED.items():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config_class(**values))
        gates = UnitGates(model.model, units, check=False)
        modules = projections(model.model, gates)
        count = subnetwork_count(gates, random_subnetwork(gates, share).unit_mask, modules)
        rank, per_rank = lora_rank(count, modules)
        total = sum(p.numel() for p in model.parameters())
        for method, trainable in (
            ("subnetwork", count),
            (f"lora r={rank}", rank * per_rank),
            ("full", total),
        ):
            if method == "full":
                sizes = (16 * total, 16 * total)
            else:
                sizes = (2 * total + 16 * trainable, 4 * total + 16 * trainable)
            fits = " / ".join("yes" if b / 1e9 <= gpu_gb else "no" for b in sizes)
            print(f"{name:<13} {method:<10} {total / 1e9:>10.2f}B {trainable / 1e6:>10.1f}M {sizes[0] / 1e9:>17.1f} "
                  f"{sizes[1] / 1e9:>17.1f} {fits:>19}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2,e5")
    parser.add_argument(
        "--share", type=float, default=0.01, help="share of the heads and of the neurons trained"
    )
    parser.add_argument(
        "--units",
        choices=("heads", "neurons", "both"),
        default="both",
        help="the kinds of unit the subnetwork holds (and whose projections LoRA and SHiRA adapt)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps (distinct batches)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the subnetwork / LoRA timing"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(steps=1, warmup=1, rounds=1, batch_size=2, length=16)
    if args.worker:
        print(json.dumps(run_job(args.worker, args)))
        return
    for name in args.models.split(","):
        if name == "e5" and not args.smoke and not (Path(E5_PATH) / "config.json").is_file():
            print(f"\ne5: skipped: multilingual-e5-small not found at {E5_PATH}: set SUBNETS_E5_PATH to a local "
                  "copy of intfloat/multilingual-e5-small")  # fmt: skip
            continue
        report(name, args)
    estimate(args.share, args.units)


if __name__ == "__main__":
    main()
