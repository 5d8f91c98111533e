"""The efficient study's figure: the target score against the parameters trained per language and
against the peak memory of a training step, each method at its chosen rate, mean and sd over seeds.

    python docs/study/efficient/budget_figure.py                 # parsing: writes budget.png
    python docs/study/efficient/budget_figure.py --task tagging  # UPOS: writes tagging/budget.png

It reads the runs in ``runs/`` (``tagging/runs/``), named ``<method>-lr<rate>-seed<seed>``: their
``results.json``, and for the subnetworks few-shot with each target's own subnetwork from
``evaluations/masks.target_policy=support`` (only the seeds so evaluated; a method with none: the
union's few-shot). Each method's rate is the study's choice: the best mean score of the source
languages' development sets at seed 1, never the targets'. The memory is measured by
``benchmarks/subnetwork_memory.py`` at the study's budget, not by the runs (MEMORY_MB below; the
encoder's step, the same for both tasks).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
METHODS = {
    "baseline": "full fine-tuning",
    "lora": "LoRA r 96",
    "shira": "SHiRA r 96",
    "static": "subnetworks, gradient-selected",
    "activation": "subnetworks, LAPE",
    "random": "subnetworks, random",
}
TASKS = {
    "parsing": ("runs", "las", "UD parsing", "LAS"),
    "tagging": ("tagging/runs", "upos", "UPOS tagging", "UPOS"),
}
# Step peak memory in MB (resident growth over one AdamW step from no gradients and no optimizer
# state) on multilingual-e5-small, batches of 16 x 64 tokens, measured by
#   python benchmarks/subnetwork_memory.py --models e5 --units neurons --share 0.25 --batch-size 16
# a quarter of the neurons (3,538,944 parameters) for every subnetwork; LoRA and SHiRA at rank 77 on
# the feed-forward projections (3,548,160; the study's adapters sit on the attention projections at
# rank 96, the same count); full fine-tuning every parameter.
MEMORY_MB = {"baseline": 1104.3, "lora": 638.8, "shira": 631.8, "static": 513.9, "activation": 513.9,
             "random": 513.9}  # fmt: skip


def fewshot_score(results: dict, metric: str) -> float:
    return statistics.mean(
        statistics.mean(r[metric] for r in language["runs"])
        for language in results["fewshot"]["languages"].values()
    )


def chosen_rates_by_folder(runs: Path) -> dict[str, str]:
    """Method (as the folders name it) -> the rate ``subnets.report`` chooses from the seed-1 sweep
    (its "Learning rates" rule), written as the folders write it."""
    from subnets.report.rates import RATE, chosen_rates
    from subnets.report.runs import load_runs, method_label

    sweep = [run for run in load_runs(runs) if run.results["seed"] == 1]
    chosen = chosen_rates(sweep)
    labels = {run.path.name.split("-lr")[0]: method_label(run, sweep, ignore=RATE) for run in sweep}
    return {method: f"{chosen[label]:g}" for method, label in labels.items() if label in chosen}


def method_scores(runs: Path, method: str, rate: str, metric: str) -> dict[str, list[float]] | None:
    """Per seed: parameters trained per language, zero-shot and few-shot score (mean over targets)."""
    out = {"parameters": [], "zeroshot": [], "fewshot": []}
    folders = sorted(runs.glob(f"{method}-lr{rate}-seed*"))
    support = [f / "evaluations" / "masks.target_policy=support" / "results.json" for f in folders]
    if any(s.exists() for s in support):  # a subnetwork method: only the seeds evaluated so
        folders, support = zip(*[(f, s) for f, s in zip(folders, support) if s.exists()])
    for folder, evaluation in zip(folders, support):
        results = json.loads((folder / "results.json").read_text())
        fewshot = json.loads(evaluation.read_text()) if evaluation.exists() else results
        out["parameters"].append(statistics.mean(results["parameters"]["updated"].values()))
        out["zeroshot"].append(results["target_mean"][metric])
        out["fewshot"].append(fewshot_score(fewshot, metric))
    return out if out["parameters"] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="parsing")
    args = parser.parse_args()
    folder, metric, title, name = TASKS[args.task]
    runs = HERE / folder
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    rates = chosen_rates_by_folder(runs)
    for index, (method, label) in enumerate(METHODS.items()):
        rate = rates.get(method)
        scores = rate and method_scores(runs, method, rate, metric)
        if not scores:
            continue
        color, seeds = f"C{index}", len(scores["fewshot"])
        nudge = 1 + 0.03 * (
            index - 2.5
        )  # the matched methods share a count: spread apart (at most 8%) to be seen
        for axis, x in (
            (axes[0], nudge * scores["parameters"][0] / 1e6),
            (axes[1], MEMORY_MB[method]),
        ):
            for setting, marker in (("zeroshot", "o"), ("fewshot", "s")):
                values = scores[setting]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                axis.errorbar(x, statistics.mean(values), yerr=sd, fmt=marker, color=color, capsize=3,
                              label=f"{label}, {float(rate):g} ({seeds} seed{'s' * (seeds > 1)})" if setting == "fewshot" else None)  # fmt: skip
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters trained per language (millions, log scale)")
    axes[1].set_xlabel("peak memory of a training step (MB, benchmarks/subnetwork_memory.py)")
    axes[0].set_ylabel(f"{name}, mean of 8 target languages")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.suptitle(
        f"{title}, multilingual-e5-small, 150 steps: zero-shot (circles), few-shot k=20 (squares)"
    )
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    output = runs.parent / "budget.png"
    figure.savefig(output, dpi=120)
    print(output)


if __name__ == "__main__":
    main()
