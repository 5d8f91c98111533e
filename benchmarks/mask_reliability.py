"""How reliable cheap mask searches are on the UD study (budget=cpu, multilingual-e5-small).

For each way of estimating head importance that costs little, the split-half agreement a run
writes to ``masks/reliability.json``: the masks selected (keep 50%, the budget's selection) from
the even and from the odd importance batches, compared by Jaccard (chance: two random masks with
the same per-layer counts), and the Spearman correlation of the two halves' scores; mean over
the eight source languages, with the seconds the search takes for all of them.

Importance is measured on

* the pretrained model after ``masks.finetune_steps`` of fine-tuning a copy on the language
  (the budget's search until 2026-12-02: 20 steps, 2 batches),
* the shared model after 50 steps of multilingual baseline training (``masks.after_steps=50``,
  a third of the budget's 150 steps; no per-language fine-tuning),

from N batches of 16 sentences (``masks.importance_batches=N``). Dynamic masks' EMA of
``|dL/dgate|`` (``dynamic.decay``) is compared on the model after 50 steps: the EMA of each half's
stream of per-batch gate gradients, as the EMA rule would accumulate them over a language's
steps (a fixed model here: the drift of a training model is not included).

Every figure comes from per-batch gate gradients computed once per model state and language
(32 batches, cycled where a language has fewer than 512 sentences; such rows are marked).

Needs SUBNETS_UD_ROOT (default ../shared/data/ud) and SUBNETS_E5_PATH
(default ../shared/models/multilingual-e5-small). About 25 minutes on 2 CPU cores (a
batch's forward and backward pass is about 1 s).

Usage::

    python benchmarks/mask_reliability.py                       # every model state
    python benchmarks/mask_reliability.py --states after50      # pretrained0, pretrained20, after50
    python benchmarks/mask_reliability.py --smoke               # tiny, 2 languages, 4 batches: does it run
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from shared_paths import e5_path, ud_root

from subnets.config import compose_config
from subnets.masks.controls import split_half_agreement
from subnets.masks.dynamic import ImportanceEMA
from subnets.masks.importance import finetuned_copy, normalize_importance, unit_importance
from subnets.masks.selection import select_keep_ratio
from subnets.runs.checkpoint import phase_rng
from subnets.training.runner import Run

BATCHES = 32  # per language and model state; options use the first N
SIZES = (2, 8, 16, 32)
DECAYS = (0.9, 0.97, 0.99)
# --smoke: the tiny random model (not e5) on 2 source languages of 64 sentences, 4 batches, the
# states after 2 steps (fine-tuning, training)
SMOKE = ["model=tiny", "languages.train=[en_ewt,ko_kaist]", "languages.dev=[bg_btb]", "languages.target=[fi_tdt]",
         "languages.max_train_sentences=64", "languages.max_eval_sentences=16"]  # fmt: skip


def batch_gradients(model, batches) -> tuple[list[torch.Tensor], float]:
    """|dL/dgate| of every batch (unnormalised), and the seconds per batch."""
    start = time.perf_counter()
    grads = [unit_importance(model, [batch], normalize=False) for batch in batches]
    return grads, (time.perf_counter() - start) / len(batches)


def agreement(first: torch.Tensor, second: torch.Tensor, keep_ratio: float) -> dict[str, float]:
    """Split-half agreement of two halves' scores, with the budget's keep-ratio mask of their sum."""
    mask = select_keep_ratio(normalize_importance(first + second), keep_ratio)
    return split_half_agreement((normalize_importance(first), normalize_importance(second)), mask)


def ema(grads: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = ImportanceEMA(tuple(grads[0].shape), decay)
    for grad in grads:
        average.update("l", grad)
    return average.scores("l", normalize=False)


def row(name: str, values: list[dict[str, float]], seconds: float, cycled: bool) -> None:
    mean = {
        key: float(np.mean([v[key] for v in values])) for key in ("jaccard", "random_jaccard", "spearman")
    }
    low = min(v["jaccard"] for v in values)
    print(f"{name:44s} jaccard {mean['jaccard']:.3f} (min {low:.2f}; chance {mean['random_jaccard']:.3f})  "
          f"spearman {mean['spearman']:.3f}  seconds {seconds:7.1f}{'  cycled' if cycled else ''}  "
          "target jaccard >= 0.8", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--states", nargs="+", default=["pretrained0", "pretrained20", "after50"],
                        help="model states to measure (default: all three)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    args = parser.parse_args()
    states, count, sizes, tuned, after = args.states, BATCHES, SIZES, 20, 50
    model = SMOKE if args.smoke else [f"model.name_or_path={e5_path()}"]
    if args.smoke:
        count, sizes, tuned, after = 4, (2, 4), 2, 2
    cfg = compose_config(["+experiment=ud_fewshot", "+method=baseline", f"languages.ud_root={ud_root()}", *model,
                          "wandb.mode=disabled", "fewshot.repetitions=0", "analysis.conflict_every=0",
                          "analysis.cka_sentences=0"])  # fmt: skip
    keep, size = cfg.masks.keep_ratio, cfg.masks.batch_size
    with tempfile.TemporaryDirectory() as folder:
        experiment = Run(cfg, folder)
        experiment.setup()
        sources, batcher = experiment.source_languages(), experiment.batcher
        batches = {
            lang: batcher.fixed(data, size, count, "importance") for lang, data in sources.train.items()
        }
        cycled = {lang: len(data) < size * count for lang, data in sources.train.items()}  # batches repeat
        print(f"{len(batches)} source languages, {count} batches of {size} sentences each "
              f"(cycled for {sum(cycled.values())} languages with fewer than {size * count} sentences); "
              f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip

        def report(state: str, grads: dict, per_batch: float, setup_seconds: float) -> None:
            for n in sizes:
                values = [agreement(sum(g[0:n:2]), sum(g[1:n:2]), keep) for g in grads.values()]
                used = any(len(sources.train[lang]) < size * n for lang in grads)
                row(
                    f"{state}, importance_batches={n}",
                    values,
                    setup_seconds + n * per_batch * len(grads),
                    used,
                )

        # the pretrained model, fine-tuned per language (the search before training)
        for steps in [s for s, state in ((0, "pretrained0"), (tuned, "pretrained20")) if state in states]:
            grads, seconds, tuning = {}, [], 0.0
            for lang, data in sources.train.items():
                with phase_rng(batcher.seed, f"masks/{lang}", batcher.device):
                    start = time.perf_counter()
                    scorer = experiment.model
                    if steps:
                        scorer = finetuned_copy(experiment.model, batcher.fixed(data, sources.batch_size, 8, "finetune"),
                                                steps, sources.make_optimizer)  # fmt: skip
                    tuning += time.perf_counter() - start
                    grads[lang], per_batch = batch_gradients(scorer, batches[lang])
                    seconds.append(per_batch)
            report(f"pretrained, finetune_steps={steps}", grads, float(np.mean(seconds)), tuning)

        # the shared model after 50 steps of multilingual (baseline) training
        if "after50" in states:
            start = time.perf_counter()
            while experiment.state.step < after:
                experiment.train_step()
            print(f"  ({after} training steps: {time.perf_counter() - start:.1f} s)", flush=True)
            results = {lang: batch_gradients(experiment.model, batches[lang]) for lang in batches}
            grads = {lang: g for lang, (g, _) in results.items()}
            report(
                f"after_steps={after}, finetune_steps=0",
                grads,
                float(np.mean([s for _, s in results.values()])),
                0.0,
            )
            for decay in DECAYS:
                values = [agreement(ema(g[0::2], decay), ema(g[1::2], decay), keep) for g in grads.values()]
                row(f"after_steps={after}, EMA decay {decay} over {count // 2} steps", values, 0.0,
                    any(cycled.values()))  # fmt: skip
        experiment.close()


if __name__ == "__main__":
    main()
