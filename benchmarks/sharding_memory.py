"""Memory of sharded training (``train.parallel=fsdp``) against data parallelism (``ddp``).

A tiny-but-not-trivial Qwen2-style decoder (about 40M parameters, built from a config with random
weights) is trained for a few masked AdamW steps (:class:`~subnets.optim.MaskedOptimizer`, half
the query heads of every layer updated) under ``torchrun`` with 2 processes, once with every
process holding the whole model (ddp) and once sharded with FSDP2
(:func:`subnets.parallel.sharding.shard_model`: each decoder layer, then the rest). Each process reports

* the bytes of parameters, gradients and optimizer state it holds, counted from the tensors'
  local storage (each storage once, FSDP2's padding included), and their ratio fsdp / ddp;
* its peak resident memory (RSS; it includes the whole model each process builds before
  sharding it, as ``subnets.train`` does, and the Python and torch runtime).

Then it prints an estimate, computed with the same accounting (not measured), for 1B, 7B and 9B
decoders on 8 GPUs of 80 GB: fp32 parameters, gradients and AdamW state (16 bytes a parameter)
on every GPU (ddp) against a shard of them plus two bf16 layers gathered at a time (fsdp with
``train.precision=bf16``), activations not included.

Usage::

    python benchmarks/sharding_memory.py            # both layouts at world size 2, then the estimate
    python benchmarks/sharding_memory.py --steps 5
    python benchmarks/sharding_memory.py --smoke    # a 2-layer decoder of 0.2M parameters, 1 step: does it run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
SMOKE = {**CONFIG, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
# Published architectures, built on the meta device to count their parameters (no download).
ESTIMATED = {
    "1B (Llama-3.2-1B layout)": (
        transformers.LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "7B (Qwen2-7B layout)": (
        transformers.Qwen2Config,
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),  # fmt: skip
    "9B (Gemma-2-9B layout)": (
        transformers.Gemma2Config,
        dict(
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
}


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this process's parameters, gradients and optimizer state (each storage once)."""
    from subnets.parallel.sharding import local

    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for tensor in tensors:
            storage = local(tensor).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    parameters = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "parameters": size(parameters),
        "gradients": size(p.grad for p in parameters if p.grad is not None),
        "optimizer": size(state),
    }


def worker(parallel: str, steps: int, output: str, config: dict) -> None:
    """One process of the torchrun job: build, (shard), train ``steps`` masked steps, report."""
    from subnets.optim import MaskedOptimizer
    from subnets.parallel.sharding import shard_model

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config))
    if parallel == "fsdp":
        shard_model(model, model.model.layers)
    optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model.named_parameters())
    heads, head_dim = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]
    rows = torch.arange(config["hidden_size"]) < heads // 2 * head_dim  # half the query heads
    mask = {f"model.layers.{i}.self_attn.q_proj.weight": rows.view(-1, 1).expand(-1, config["hidden_size"])
            for i in range(config["num_hidden_layers"])}  # fmt: skip
    generator = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        ids = torch.randint(0, config["vocab_size"], (4, 64), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if parallel == "ddp":  # every process holds whole gradients: average them (as subnets does)
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)
        optimizer.step(update_mask=mask)
    held = held_bytes(model, optimizer)
    held["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held["parameter_count"] = sum(p.numel() for p in model.parameters())
    held["loss"] = float(loss)
    Path(output, f"{parallel}-{rank}.json").write_text(json.dumps(held))
    torch.distributed.destroy_process_group()


def measure(parallel: str, steps: int, folder: str, smoke: bool) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", parallel, "--steps", str(steps), "--output", folder,
               *(["--smoke"] if smoke else [])]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode:
        sys.exit(f"torchrun ({parallel}) failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(folder, f"{parallel}-{rank}.json").read_text()) for rank in (0, 1)]


def estimate(gpus: int = 8, gpu_gb: float = 80.0) -> None:
    print(
        f"\nEstimate (computed, not measured) per GPU on {gpus} x {gpu_gb:.0f} GB, AdamW, activations excluded:"
    )
    print(f"{'model':<26} {'parameters':>11} {'ddp GB':>8} {'fsdp GB':>8} {'fits (ddp / fsdp)':>18}")
    for name, (config_class, values) in ESTIMATED.items():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config_class(**values))
        count = sum(p.numel() for p in model.parameters())
        layer = max(sum(p.numel() for p in block.parameters()) for block in model.model.layers)
        ddp = 16 * count  # fp32 parameters, gradients, AdamW's two moments
        fsdp = 16 * count / gpus + 2 * 2 * layer  # a shard of those, two bf16 layers gathered
        fits = " / ".join("yes" if b / 1e9 < gpu_gb else "no" for b in (ddp, fsdp))
        print(f"{name:<26} {count / 1e9:>10.2f}B {ddp / 1e9:>8.1f} {fsdp / 1e9:>8.1f} {fits:>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=["ddp", "fsdp"])
    parser.add_argument("--output")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    if args.smoke and not args.worker:
        args.steps = 1
    if args.worker:
        return worker(args.worker, args.steps, args.output, SMOKE if args.smoke else CONFIG)
    with tempfile.TemporaryDirectory() as folder:
        ranks = {parallel: measure(parallel, args.steps, folder, args.smoke) for parallel in ("ddp", "fsdp")}
    count = ranks["ddp"][0]["parameter_count"]
    print(
        f"Qwen2-style decoder, {count / 1e6:.1f}M parameters, world size 2, {args.steps} masked AdamW steps"
    )
    print(f"{'':<6} {'rank':>4} {'parameters MB':>14} {'gradients MB':>13} {'optimizer MB':>13} {'total MB':>9} "
          f"{'peak RSS MB':>12}")  # fmt: skip
    totals = {}
    for parallel, reports in ranks.items():
        for rank, r in enumerate(reports):
            total = r["parameters"] + r["gradients"] + r["optimizer"]
            totals.setdefault(parallel, []).append(total)
            print(f"{parallel:<6} {rank:>4} {r['parameters'] / 1e6:>14.1f} {r['gradients'] / 1e6:>13.1f} "
                  f"{r['optimizer'] / 1e6:>13.1f} {total / 1e6:>9.1f} {r['peak_rss'] / 1e6:>12.0f}")  # fmt: skip
    ratio = max(totals["fsdp"]) / max(totals["ddp"])
    rss = max(r["peak_rss"] for r in ranks["fsdp"]) / max(r["peak_rss"] for r in ranks["ddp"])
    print(f"fsdp / ddp, bytes held per rank (largest rank): {ratio:.3f} (goal <= 0.55); peak RSS: {rss:.2f}")
    estimate()


if __name__ == "__main__":
    main()
