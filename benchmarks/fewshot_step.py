"""Few-shot adaptation step benchmark: one padded batch of the k support sentences against the
length-sorted micro-batches of ``fewshot.max_tokens`` (:meth:`Batcher.micro_batches`).

For each repetition's support set of one target language (drawn as the protocol draws it:
seed ``1000 * seed + r``), it prints the real and padded subword counts and the median seconds
of a few-shot fine-tuning step (forward, backward, AdamW) both ways, timed in the same process
with the two alternating. The default is fi_tdt, whose support pool (its dev split) holds a
177-word sentence, with multilingual-e5-small.

Usage::

    python benchmarks/fewshot_step.py                        # fi_tdt, 5 repetitions, 3 steps each
    python benchmarks/fewshot_step.py --language de_gsd --model tiny
    python benchmarks/fewshot_step.py --smoke                # tiny, 1 repetition of 1 step: does it run

Needs SUBNETS_UD_ROOT (default ../shared/data/ud) and SUBNETS_E5_PATH
(default ../shared/models/multilingual-e5-small).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from shared_paths import e5_path, ud_root

from subnets.config import compose_config
from subnets.data.batching import Collator
from subnets.data.dataset import Batcher, load_language
from subnets.data.discovery import discover_languages
from subnets.data.support import draw_support, support_pool
from subnets.models.build import build_encoder, build_model
from subnets.models.encoder import max_subwords
from subnets.optim.masked import MaskedOptimizer
from subnets.tasks import Parsing
from subnets.training.update import parameter_groups, training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--language", default="fi_tdt")
    parser.add_argument("--model", default="e5", choices=["tiny", "e5"])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per way and repetition")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(model="tiny", repetitions=1, steps=1)

    treebank = discover_languages(ud_root())[args.language]
    test = load_language(treebank, "test", Parsing())
    model_settings = [] if args.model == "tiny" else ["model=e5_small", f"model.name_or_path={e5_path()}"]
    cfg = compose_config(model_settings)
    transformer, tokenizer = build_encoder(
        cfg.model, seed=0, texts=[" ".join(s.forms) for s in test.examples]
    )
    model = build_model(cfg.model, transformer, Parsing())
    optimizer = MaskedOptimizer(
        torch.optim.AdamW(parameter_groups(model, 5e-5, 1e-3, 0.01)), model.named_parameters()
    )
    batcher = Batcher(Collator(tokenizer, max_subwords(transformer, tokenizer)), "cpu")

    def step(batches) -> float:
        start = time.perf_counter()
        training_step(model, batches, optimizer, clip_norm=5.0)
        return time.perf_counter() - start

    total = {"whole": 0.0, "micro": 0.0}
    print(
        f"{args.language} {args.model}: k={args.k}, fewshot.max_tokens={args.max_tokens}, median of {args.steps} steps"
    )
    print(
        "repetition  real subwords  padded (one batch)  padded (micro)  parts  s/step one batch  s/step micro  ratio"
    )
    pool = support_pool(treebank, test, args.k, Parsing())
    for repetition in range(args.repetitions):
        support, _ = draw_support(pool, test, args.k, 1000 * args.seed + repetition)
        support.tokenize(tokenizer)
        whole, micro = batcher.of(support), batcher.micro_batches(support, args.max_tokens)
        times = {"whole": [], "micro": []}
        for _ in range(args.steps):
            times["whole"].append(step(whole))
            times["micro"].append(step(micro))
        seconds = {way: statistics.median(t) for way, t in times.items()}
        for way in total:
            total[way] += seconds[way]
        real = int(whole.attention_mask.sum())
        padded = {
            name: sum(b.input_ids.numel() for b in batches)
            for name, batches in (("whole", [whole]), ("micro", micro))
        }
        print(f"{repetition:10d}  {real:13d}  {padded['whole']:18d}  {padded['micro']:14d}  {len(micro):5d}  "
              f"{seconds['whole']:16.3f}  {seconds['micro']:12.3f}  {seconds['micro'] / seconds['whole']:.3f}")  # fmt: skip
    print(f"all repetitions: micro-batched / one batch {total['micro'] / total['whole']:.3f}")


if __name__ == "__main__":
    main()
