"""The study's figures, each a function of the runs (None where they hold nothing to draw)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from subnets.analysis.conflict import load_conflict
from subnets.analysis.similarity import load_cka
from subnets.masks.figures import plot_history
from subnets.report.runs import Run, first_per_method, methods_of, task_record
from subnets.report.scores import conflict_over_time, overlap_typology, score_table


# ---------------------------------------------------------------------------- figures
def _pyplot():
    # no matplotlib.use(): a notebook keeps its inline backend; without a display pyplot picks Agg
    import matplotlib.pyplot as plt

    return plt


def scores_figure(runs: Sequence[Run], setting: str = "fewshot", metric: str | None = None):
    """Grouped bars: per target language (and the average) the score of each method, +- sd."""
    metric = metric or task_record(runs)["primary_metric"]
    plt = _pyplot()
    rows = score_table(runs, setting, metric)
    methods = methods_of(runs)
    languages = list(dict.fromkeys(r["language"] for r in rows))
    cell = {(r["language"], r["method"]): r for r in rows}
    figure, ax = plt.subplots(figsize=(max(6, 1.1 * len(languages) * max(1, len(methods)) / 3), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        x = [j + i * width for j, code in enumerate(languages) if (code, method) in cell]
        present = [code for code in languages if (code, method) in cell]
        ax.bar(x, [cell[(c, method)]["mean"] for c in present], width, yerr=[cell[(c, method)]["sd"] for c in present],
               label=method, capsize=2)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(languages))], languages, rotation=30)
    ax.set_ylabel(f"{'few-shot' if setting == 'fewshot' else 'zero-shot'} {metric.upper()}")
    ax.legend(fontsize=8, ncol=min(3, len(methods)))
    figure.tight_layout()
    return figure


def _heatmaps(matrices: list[tuple[str, list[str], np.ndarray]], vmin: float, vmax: float, cmap: str):
    plt = _pyplot()
    columns = min(3, len(matrices))
    rows = math.ceil(len(matrices) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(matrices) :]:
        ax.axis("off")
    for ax, (title, languages, matrix) in zip(axes.flat, matrices):
        image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_xticks(range(len(languages)), languages, rotation=90, fontsize=7)
        ax.set_yticks(range(len(languages)), languages, fontsize=7)
        ax.set_title(title, fontsize=9)
        for (a, b), value in np.ndenumerate(matrix):
            ax.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=5)
        figure.colorbar(image, ax=ax, fraction=0.046)
    figure.tight_layout()
    return figure


def mask_overlap_figure(runs: Sequence[Run]):
    """Jaccard overlap heatmaps of the head masks, one per subnetwork method (its first seed)."""
    matrices = [
        (
            f"{run.method} (seed {run.seed})",
            summary["jaccard"]["languages"],
            np.array(summary["jaccard"]["matrix"]),
        )
        for run, summary in first_per_method(runs, Run.masks_summary)
    ]
    return _heatmaps(matrices, 0, 1, "viridis") if matrices else None


def dynamic_masks_figure(runs: Sequence[Run]):
    """Share of heads removed and heads changed at each mask update, per language, one column
    per dynamic method (its first seed)."""
    histories = first_per_method(runs, Run.mask_history)
    if not histories:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(
        2, len(histories), figsize=(5 * len(histories), 5.5), squeeze=False, sharex="col"
    )
    for column, (run, history) in enumerate(histories):
        plot_history(history, axes[0, column], axes[1, column])
        axes[0, column].set_title(f"{run.method} (seed {run.seed})")
    axes[0, 0].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def dev_curve_figure(runs: Sequence[Run]):
    """The development metric (``dev/metric`` in metrics.jsonl) against the training step, one
    line per method (mean over seeds, shaded: min to max)."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        path = run.path / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            if "dev/metric" in record:
                curves[run.method][record["step"]].append(record["dev/metric"])
    if not curves:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.8))
    for method, by_step in curves.items():
        steps = sorted(by_step)
        ax.plot(steps, [np.mean(by_step[s]) for s in steps], label=method)
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("development metric")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def conflict_figure(runs: Sequence[Run]):
    """Share of language pairs whose gradients conflict (negative cosine) against the training
    step, one line per method (mean over seeds)."""
    over_time = conflict_over_time(runs)
    if not over_time:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.8))
    for method, by_step in over_time.items():
        steps = sorted(by_step)
        ax.plot(steps, [np.mean(by_step[s]) for s in steps], marker="o", label=method)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of language pairs with cosine < 0")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def conflict_matrices_figure(runs: Sequence[Run]):
    """Gradient cosines between languages at each method's last measurement (first seed)."""
    matrices = [
        (
            f"{run.method}, step {records[-1]['step']}",
            records[-1]["languages"],
            np.array(records[-1]["cosine"]),
        )
        for run, records in first_per_method(runs, lambda run: load_conflict(run.path))
    ]
    return _heatmaps(matrices, -1, 1, "coolwarm") if matrices else None


def overlap_typology_figure(runs: Sequence[Run]):
    """Mask overlap against URIEL syntactic similarity, one point per language pair and method."""
    correlations = overlap_typology(runs)
    if not correlations:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 4))
    for entry in correlations:
        upper = np.triu_indices(len(entry["languages"]), k=1)
        ax.scatter(entry["similarity"][upper], entry["overlap"][upper], s=14,
                   label=f"{entry['method']} (rho={entry['rho']:.2f}, p={entry['p']:.2g})")  # fmt: skip
    ax.set_xlabel("URIEL syntactic similarity (cosine)")
    ax.set_ylabel("head-mask Jaccard overlap")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def cka_figure(runs: Sequence[Run]):
    """Linear CKA between parallel languages: before training (the first run that measured it)
    and after, per method (its first seed)."""
    before = next((cka["before"] for cka in (load_cka(run.path) for run in runs) if "before" in cka), None)
    matrices = [("before training", before["languages"], np.array(before["matrix"]))] if before else []
    matrices += [
        (f"{run.method} (seed {run.seed})", after["languages"], np.array(after["matrix"]))
        for run, after in first_per_method(runs, lambda run: load_cka(run.path).get("after"))
    ]
    return _heatmaps(matrices, 0, 1, "magma") if matrices else None


FIGURES = {  # the few-shot scores figure comes first, named by the task's primary metric
    "mask_overlap.png": mask_overlap_figure,
    "dynamic_masks.png": dynamic_masks_figure,
    "dev_curve.png": dev_curve_figure,
    "gradient_conflict.png": conflict_figure,
    "conflict_matrices.png": conflict_matrices_figure,
    "overlap_typology.png": overlap_typology_figure,
    "cka.png": cka_figure,
}
