"""The study report: ``python -m subnets.report <folder>`` turns a (multi)run folder into tables,
significance statements and figures.

Every run folder under ``<folder>`` (one that holds ``results.json``) is one method and seed.
Runs of one method with other settings (a sweep over ``method.apply`` or ``masks.keep_ratio``)
are reported apart, labelled by the settings that differ (``static (method.apply=both)``).
The report goes to ``<folder>/report/`` (``--out`` to change it)::

    report.md                 tables, significance statements, analyses, figure links
    results.csv               every table cell: setting, metric, language, method, mean, sd, n
    fewshot_<metric>.png      per-language few-shot primary metric (LAS for parsing), one bar per method (+- sd)
    mask_overlap.png          Jaccard overlap of the languages' head masks (subnetwork methods)
    dynamic_masks.png         sparsity and heads changed per mask update (dynamic methods)
    dev_curve.png             development metric over training (mean over seeds)
    gradient_conflict.png     share of language pairs with conflicting gradients over training
    conflict_matrices.png     gradient cosines between languages at the last measurement
    overlap_typology.png      mask overlap against URIEL syntactic similarity
    cka.png                   linear CKA between parallel languages, before and after training

Each piece is also a function (:func:`load_runs`, :func:`score_table`, :func:`significance`, the
``*_figure`` functions) for notebooks.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from subnets.analysis.conflict import load_conflict
from subnets.analysis.similarity import load_cka
from subnets.analysis.typology import overlap_typology_correlation, typological_similarity, uriel_code
from subnets.masks.controls import chance_jaccard
from subnets.masks.controls import jaccard as mask_jaccard
from subnets.masks.figures import plot_history
from subnets.masks.subnetwork import SubnetworkSet
from subnets.results import task_of

BASELINE = "baseline"
CONTROLS = {"static": "random", "maml_static": "maml_random"}  # a method and its random-mask control
METHOD_ORDER = (
    "baseline",
    "random",
    "static",
    "dynamic",
    "maml",
    "maml_random",
    "maml_static",
    "maml_dynamic",
)


@dataclass
class Run:
    """One finished run: its folder, method label (the method's name, and the settings that set
    it apart from the other runs of the folder), seed and ``results.json``."""

    path: Path
    method: str
    seed: int
    results: dict[str, Any]
    settings: tuple[str, ...] = ()  # its command-line settings other than the method and seed

    def masks_summary(self) -> dict[str, Any] | None:
        """``masks/summary.json`` (sparsity and Jaccard overlap), or None for a method without masks."""
        path = self.path / "masks" / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def mask_history(self) -> dict[str, list[dict[str, Any]]] | None:
        """``masks/history.json`` of a dynamic run, or None."""
        path = self.path / "masks" / "history.json"
        return json.loads(path.read_text()) if path.exists() else None


def load_runs(folder: str | os.PathLike) -> list[Run]:
    """The finished runs in ``folder`` (a run folder, or a multirun folder of run folders),
    ordered by method (:data:`METHOD_ORDER`) and seed. Raises FileNotFoundError when none is found."""
    folder = Path(folder)
    paths = (
        [folder / "results.json"]
        if (folder / "results.json").exists()
        else sorted(folder.glob("*/results.json"))
    )
    runs = []
    for path in paths:
        try:
            results = json.loads(path.read_text())
            runs.append(
                Run(path.parent, results["method"], int(results["seed"]), results, _settings(path.parent))
            )
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path}: not a results.json written by subnets ({error})") from error
    if not runs:
        raise FileNotFoundError(f"no run folders with results.json under {folder}")
    shared = set.intersection(*(set(r.settings) for r in runs))
    for run in runs:
        differing = [s for s in run.settings if s not in shared]
        if differing:
            run.method = f"{run.method} ({', '.join(differing)})"
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(runs, key=lambda r: (rank.get(r.results["method"], len(rank)), r.method, r.seed))


def _settings(folder: Path) -> tuple[str, ...]:
    """The run's command-line overrides (``.hydra/overrides.yaml``) but its method and seed."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ()
    from omegaconf import OmegaConf

    overrides = [str(o) for o in OmegaConf.load(path)]
    return tuple(sorted(o for o in overrides if o.split("=")[0].lstrip("+~") not in ("method", "seed")))


def methods_of(runs: Sequence[Run]) -> list[str]:
    """The methods of ``runs`` in report order."""
    return list(dict.fromkeys(r.method for r in runs))


def first_per_method(runs: Sequence[Run], load: Callable[[Run], Any]) -> list[tuple[Run, Any]]:
    """``(run, load(run))`` for each method's first run (in report order) for which ``load``
    returns something (neither None nor empty)."""
    out, seen = [], set()
    for run in runs:
        if run.method not in seen:
            value = load(run)
            if value:
                seen.add(run.method)
                out.append((run, value))
    return out


# ---------------------------------------------------------------------------- scores
def task_record(runs: Sequence[Run]) -> dict[str, Any]:
    """The task the runs share (results.json ``task``: name, metrics, primary metric); runs of
    different tasks cannot be compared in one report."""
    tasks = {task_of(r.results)["name"] for r in runs}
    if len(tasks) > 1:
        raise ValueError(
            f"the runs are of different tasks ({', '.join(sorted(tasks))}); report each task's runs apart"
        )
    return task_of(runs[0].results)


def scores(
    runs: Sequence[Run], setting: str = "fewshot", metric: str | None = None
) -> dict[tuple[str, str], dict[int, list[float]]]:
    """``(method, language) -> seed -> values`` of the target languages: the few-shot
    repetitions (``setting="fewshot"``) or the single zero-shot score (``"zeroshot"``), of
    ``metric`` (default: the task's primary metric, :func:`task_record`)."""
    metric = metric or task_record(runs)["primary_metric"]
    out: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(dict)
    for run in runs:
        if setting == "fewshot":
            for code, summary in run.results.get("fewshot", {}).get("languages", {}).items():
                if all(metric in r for r in summary["runs"]):
                    out[(run.method, code)][run.seed] = [r[metric] for r in summary["runs"]]
        else:
            for code, s in run.results.get("target", {}).items():
                if metric in s:
                    out[(run.method, code)][run.seed] = [s[metric]]
    return dict(out)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def score_table(
    runs: Sequence[Run], setting: str = "fewshot", metric: str | None = None
) -> list[dict[str, Any]]:
    """Rows ``{language, method, mean, sd, n}``: per target language and method, the mean and
    standard deviation (ddof 1) over every seed and repetition; then per method the ``average``
    row: the mean over languages, its sd over the (seed, repetition) draws of the
    language-averaged score."""
    table = scores(runs, setting, metric)
    rows = []
    languages = list(dict.fromkeys(code for _, code in table))
    for code in languages:
        for method in methods_of(runs):
            if (method, code) in table:
                values = [v for seed_values in table[(method, code)].values() for v in seed_values]
                mean, sd = _mean_sd(values)
                rows.append({"language": code, "method": method, "mean": mean, "sd": sd, "n": len(values)})
    for method in methods_of(runs):
        per_language = [table[(method, code)] for code in languages if (method, code) in table]
        if not per_language:
            continue
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in per_language)))
        draws = [
            float(np.mean([by_seed[seed][r] for by_seed in per_language]))
            for seed in seeds
            for r in range(min(len(by_seed[seed]) for by_seed in per_language))
        ]
        mean = float(
            np.mean([np.mean([v for vs in by_seed.values() for v in vs]) for by_seed in per_language])
        )
        rows.append(
            {"language": "average", "method": method, "mean": mean, "sd": _mean_sd(draws)[1], "n": len(draws)}
        )
    return rows


def wilcoxon_test(differences: Sequence[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired differences (scipy; exact for small
    samples without ties). All differences zero: p = 1."""
    differences = np.asarray(differences, dtype=float)
    if not differences.size:
        raise ValueError("wilcoxon_test: no paired differences")
    if np.all(differences == 0):
        return {"test": "Wilcoxon signed-rank (two-sided)", "statistic": 0.0, "p": 1.0, "n": len(differences)}
    result = stats.wilcoxon(differences, alternative="two-sided")
    return {"test": "Wilcoxon signed-rank (two-sided)", "statistic": float(result.statistic),
            "p": float(result.pvalue), "n": len(differences)}  # fmt: skip


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def significance(
    runs: Sequence[Run],
    setting: str = "fewshot",
    metric: str | None = None,
    alpha: float = 0.05,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Per ``(method, reference)`` pair (default: every method against the baseline): the
    method's gain over the reference, paired by target language and seed (each side the mean
    over that seed's repetitions), tested with :func:`wilcoxon_test`; p-values Holm-adjusted over
    the pairs compared."""
    table = scores(runs, setting, metric)
    if pairs is None:
        pairs = [(method, BASELINE) for method in methods_of(runs) if method != BASELINE]
    out = []
    for method, reference in pairs:
        differences = [
            float(np.mean(values) - np.mean(table[(reference, code)][seed]))
            for (m, code), by_seed in table.items()
            if m == method
            for seed, values in by_seed.items()
            if seed in table.get((reference, code), {})
        ]
        if differences:
            out.append({"method": method, "reference": reference, "mean_gain": float(np.mean(differences)),
                        **wilcoxon_test(differences)})  # fmt: skip
    for entry, adjusted in zip(out, holm([e["p"] for e in out])):
        entry["p_holm"] = adjusted
        entry["significant"] = adjusted < alpha
    return out


def control_pairs(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """``(method, control)`` pairs present in ``runs``: each subnetwork method and its random-mask
    control (:data:`CONTROLS`; labelled variants included), and each labelled variant and its
    method with the default settings (``static (method.apply=both)`` against ``static``)."""
    methods = methods_of(runs)
    names = {r.method: r.results["method"] for r in runs}
    pairs = [(m, CONTROLS[names[m]]) for m in methods if CONTROLS.get(names[m]) in methods]
    pairs += [(m, names[m]) for m in methods if m != names[m] and names[m] in methods]
    return pairs


def significance_statement(entry: dict[str, Any], metric: str = "LAS", alpha: float = 0.05,
                           lower_is_better: bool = False) -> str:  # fmt: skip
    """One sentence for a :func:`significance` entry (the difference is the method's score minus
    the reference's; ``lower_is_better`` says so, as for perplexity)."""
    verdict = "significant" if entry["significant"] else "not significant"
    reference = entry.get("reference", BASELINE)
    reference = "the baseline" if reference == BASELINE else reference
    metric = f"{metric} (lower is better)" if lower_is_better else metric
    return (f"{entry['method']}: {entry['mean_gain']:+.2f} {metric} over {reference} (mean of {entry['n']} "
            f"language x seed pairs); {entry['test']} p = {entry['p']:.3g}, Holm-adjusted {entry['p_holm']:.3g}: "
            f"{verdict} at alpha = {alpha}.")  # fmt: skip


def markdown_table(rows: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """A language x method Markdown table of ``mean +- sd`` cells from :func:`score_table` rows."""
    cells = {(r["language"], r["method"]): f"{r['mean']:.2f} ± {r['sd']:.2f}" for r in rows}
    languages = list(dict.fromkeys(r["language"] for r in rows))
    lines = ["| language | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for code in languages:
        name = f"**{code}**" if code == "average" else code
        lines.append(f"| {name} | " + " | ".join(cells.get((code, m), "-") for m in methods) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- analyses
def conflict_over_time(runs: Sequence[Run]) -> dict[str, dict[int, list[float]]]:
    """``method -> step -> negative shares`` (one per seed) from the runs' gradient-conflict files."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for record in load_conflict(run.path):
            out[run.method][record["step"]].append(record["negative_share"])
    return {m: dict(by_step) for m, by_step in out.items()}


def overlap_typology(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per subnetwork method (its first seed's final masks): Spearman correlation of head-mask
    Jaccard overlap with URIEL syntactic similarity over language pairs
    (:func:`~subnets.analysis.overlap_typology_correlation`). Methods whose languages URIEL does
    not know (e.g. synthetic ones) are left out."""

    def usable_jaccard(run: Run) -> dict[str, Any] | None:
        summary = run.masks_summary()
        if summary is None or run.results.get("data") == "synthetic":
            return None
        languages = summary["jaccard"]["languages"]
        known = len(languages) >= 3 and all(uriel_code(c) is not None for c in languages)
        return summary["jaccard"] if known else None

    out = []
    for run, jaccard in first_per_method(runs, usable_jaccard):
        languages = jaccard["languages"]
        overlap = np.array(jaccard["matrix"])
        _, similarity = typological_similarity(languages)
        out.append({"method": run.method, "seed": run.seed, "languages": languages, "overlap": overlap,
                    "similarity": similarity, **overlap_typology_correlation(languages, overlap, similarity)})  # fmt: skip
    return out


def mask_reliability(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per method with masks: the static search's split-half reliability (mean over runs and
    languages of ``masks/summary.json``'s ``reliability``: Jaccard, its chance level, Spearman)
    and the agreement of the final masks across seeds (mean Jaccard over pairs of runs with
    different seeds and their shared languages, and the chance level of those head counts,
    (:func:`~subnets.masks.controls.chance_jaccard`)."""
    rows = []
    for method in methods_of(runs):
        masked = [r for r in runs if r.method == method and (r.path / "masks" / "masks.safetensors").exists()]
        if not masked:
            continue
        row: dict[str, Any] = {"method": method, "runs": len(masked)}
        halves = [v for r in masked for v in ((r.masks_summary() or {}).get("reliability") or {}).values()]
        if halves:
            for key in ("jaccard", "random_jaccard", "spearman"):
                row[f"split_half_{key}"] = float(np.mean([h[key] for h in halves]))
        sets = [(r.seed, SubnetworkSet.load(r.path / "masks" / "masks.safetensors")) for r in masked]
        observed, chance = [], []
        for (seed_a, a), (seed_b, b) in itertools.combinations(sets, 2):
            if seed_a == seed_b:
                continue
            for lang in set(a) & set(b):
                first, second = a[lang].unit_mask, b[lang].unit_mask
                observed.append(mask_jaccard(first, second))
                chance.append(chance_jaccard(first, second, a.units))
        if observed:
            row["seed_jaccard"], row["seed_random_jaccard"] = float(np.mean(observed)), float(np.mean(chance))
        rows.append(row)
    return rows


def cka_summary(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per run with CKA files: mean off-diagonal linear CKA before and after training."""
    out = []
    for run in runs:
        cka = load_cka(run.path)
        if "before" in cka and "after" in cka:
            means = {}
            for when in ("before", "after"):
                matrix = np.array(cka[when]["matrix"])
                means[when] = float(matrix[np.triu_indices(len(matrix), k=1)].mean())
            out.append({"method": run.method, "seed": run.seed, "languages": cka["after"]["languages"],
                        "sentences": cka["after"]["sentences"], **means})  # fmt: skip
    return out


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


# ---------------------------------------------------------------------------- the report
def write_report(
    folder: str | os.PathLike, out: str | os.PathLike | None = None, alpha: float = 0.05
) -> Path:
    """Write ``report.md``, ``results.csv`` and the figures for the runs under ``folder``
    into ``out`` (default ``<folder>/report``); returns the path of ``report.md``."""
    runs = load_runs(folder)
    out = Path(out) if out else Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    methods = methods_of(runs)
    seeds = {m: sorted({r.seed for r in runs if r.method == m}) for m in methods}
    lines = [f"# Report: {Path(folder).resolve().name}", "",
             f"{len(runs)} runs; seeds per method: " + ", ".join(f"{m} {seeds[m]}" for m in methods) + "."]  # fmt: skip
    unfinished = sorted(
        p.parent.name for p in Path(folder).glob("*/.hydra") if not (p.parent / "results.json").exists()
    )
    if unfinished:
        lines.append(f"Left out, unfinished (no results.json): {', '.join(unfinished)}.")
    fewshot = runs[0].results.get("fewshot", {})
    if fewshot:
        lines.append(f"Few-shot: k = {fewshot['k']} support sentences, {fewshot['steps']} steps, "
                     f"{fewshot['repetitions']} repetitions per seed. Cells: mean ± sd over seeds and repetitions.")  # fmt: skip
    task = task_record(runs)
    primary, lower = task["primary_metric"], task.get("lower_is_better", False)
    lines.append(
        f"Task: {task['name']}; primary metric {primary.upper()}{' (lower is better)' if lower else ''}."
    )
    csv_rows = []
    for setting, title in (("fewshot", "Few-shot"), ("zeroshot", "Zero-shot")):
        for metric in [primary, *(m for m in task["metrics"] if m != primary)]:
            rows = score_table(runs, setting, metric)
            if not rows:
                continue
            csv_rows += [{"setting": setting, "metric": metric, **r} for r in rows]
            lines += [
                "",
                f"## {title} {metric.upper()} on the target languages",
                "",
                markdown_table(rows, methods),
            ]
    for setting, title in (("fewshot", "few-shot"), ("zeroshot", "zero-shot")):
        for heading, pairs in (("Gains over the baseline", None), ("Against the random control and the default settings",
                                                                    control_pairs(runs))):  # fmt: skip
            if (pairs is None and BASELINE not in methods) or pairs == [] or len(methods) < 2:
                continue
            entries = significance(runs, setting, primary, alpha, pairs)
            lines += ["", f"## {heading} ({title} {primary.upper()})", ""]
            lines += [f"- {significance_statement(e, primary.upper(), alpha, lower)}" for e in entries] or [
                "- no paired results"
            ]
    if len(methods) > 1:
        lines += ["", "Pairs: target language x seed, each side the mean over that seed's repetitions (few-shot). "
                  "Holm-Bonferroni adjustment over the comparisons of each list."]  # fmt: skip
    conflicts = conflict_over_time(runs)
    if conflicts:
        lines += ["", "## Gradient conflict", "",
                  "Share of language pairs whose gradients on the shared parameters have negative cosine "
                  "(mean over seeds), at the first and last measurement:", ""]  # fmt: skip
        for method, by_step in conflicts.items():
            first, last = min(by_step), max(by_step)
            lines.append(
                f"- {method}: step {first}: {np.mean(by_step[first]):.3f}, step {last}: {np.mean(by_step[last]):.3f}"
            )
    correlations = overlap_typology(runs)
    if correlations:
        lines += ["", "## Subnetwork overlap and typology", "",
                  "Spearman correlation between head-mask Jaccard overlap and URIEL syntactic similarity "
                  "(cosine of lang2vec `syntax_knn` vectors) over language pairs; p from a Mantel permutation test:", ""]  # fmt: skip
        lines += [f"- {c['method']} (seed {c['seed']}): rho = {c['rho']:.3f}, p = {c['p']:.3g} ({c['pairs']} pairs)"
                  for c in correlations]  # fmt: skip
    reliability = [r for r in mask_reliability(runs) if len(r) > 2]
    if reliability:

        def cell(row, key):
            if key not in row:
                return "-"
            return f"{row[key]:.2f}" + (f" ({row[key.replace('_jaccard', '_random_jaccard')]:.2f})"
                                        if key.endswith("_jaccard") else "")  # fmt: skip

        lines += ["", "## Mask reliability", "",
                  "Split-half: masks selected (with each mask's per-layer counts) from head importance on two "
                  "disjoint halves of the importance batches, and the Spearman correlation of the two score maps. "
                  "Across seeds: the final masks of runs with different seeds. In brackets: the Jaccard overlap "
                  "random masks of the same per-layer counts would have on average.", "",
                  "| method | runs | split-half Jaccard (chance) | split-half Spearman | across seeds Jaccard (chance) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['method']} | {r['runs']} | {cell(r, 'split_half_jaccard')} | "
                  f"{cell(r, 'split_half_spearman')} | {cell(r, 'seed_jaccard')} |" for r in reliability]  # fmt: skip
    cka = cka_summary(runs)
    if cka:
        lines += ["", "## Representation similarity (linear CKA)", "",
                  f"Mean CKA between the parallel languages {', '.join(cka[0]['languages'])} "
                  f"({cka[0]['sentences']} sentences, sentence-mean word representations):", "",
                  "| method | seed | before | after |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {c['method']} | {c['seed']} | {c['before']:.3f} | {c['after']:.3f} |" for c in cka]
    drawn = []
    for name, draw in {f"fewshot_{primary}.png": scores_figure, **FIGURES}.items():
        figure = draw(runs)
        if figure is not None:
            figure.savefig(out / name, dpi=110)
            _pyplot().close(figure)
            drawn.append(name)
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in drawn]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["setting", "metric", "language", "method", "mean", "sd", "n"])
        writer.writeheader()
        writer.writerows(csv_rows)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m subnets.report: subnets.cli.report
    from subnets.cli.report import main

    main()
