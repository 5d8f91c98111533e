"""``report.md``, ``results.csv`` and the figures of a study folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from subnets.report.figures import FIGURES, _pyplot, scores_figure
from subnets.report.rates import rate_table
from subnets.report.runs import BASELINE, load_runs, methods_of, task_record
from subnets.report.scores import (
    cka_summary,
    conflict_over_time,
    control_pairs,
    markdown_table,
    mask_reliability,
    overlap_typology,
    parameter_budgets,
    score_table,
    scores,
    significance,
    significance_statement,
)


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
    for setting, title in (("fewshot", "Few-shot"), ("zeroshot", "Zero-shot"), ("source", "Source")):
        for metric in [primary, *(m for m in task["metrics"] if m != primary)]:
            rows = score_table(runs, setting, metric)
            if not rows:
                continue
            csv_rows += [{"setting": setting, "metric": metric, **r} for r in rows]
            languages = "training languages (development sets)" if setting == "source" else "target languages"
            lines += [
                "",
                f"## {title} {metric.upper()} on the {languages}",
                "",
                markdown_table(rows, methods),
            ]
    budgets = parameter_budgets(runs, alpha)
    if budgets:

        def score(value):
            return "-" if value is None else f"{value:.2f}"

        def test(entry):
            return "-" if entry is None else f"{entry['mean_gain']:+.2f} (p {entry['p_holm']:.2g})"

        control = budgets[0]["control"] or "random control"
        lines += ["", "## Parameter budgets", "",
                  f"Trainable parameters, the parameters a training language's steps may update (mean over the "
                  f"training languages), the {primary.upper()} averaged over the target languages, and the few-shot "
                  f"difference from the baseline and from {control} (the static subnetwork's random control) with its "
                  "Holm-adjusted Wilcoxon p over the table's methods (pairs: target language x seed).", "",
                  f"| method | trainable | updated per language | zero-shot {primary.upper()} | few-shot {primary.upper()} "
                  f"| few-shot vs baseline | few-shot vs {control} |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {b['method']} | {b['trainable']:,} | {b['updated']:,.0f} | {score(b['zeroshot'])} | "
                  f"{score(b['fewshot'])} | {test(b['vs_baseline'])} | {test(b['vs_control'])} |" for b in budgets]  # fmt: skip
    rates = rate_table(runs)
    if rates:
        lines += ["", "## Learning rates", "", *rates]
    for setting, title in (("fewshot", "few-shot"), ("zeroshot", "zero-shot"), ("source", "source")):
        if not scores(runs, setting, primary):
            continue
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
