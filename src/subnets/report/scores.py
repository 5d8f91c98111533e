"""The study's numbers: score tables, significance tests and the analyses' summaries."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from subnets.analysis.conflict import load_conflict
from subnets.analysis.similarity import load_cka
from subnets.analysis.typology import overlap_typology_correlation, typological_similarity, uriel_code
from subnets.masks.controls import chance_jaccard
from subnets.masks.controls import jaccard as mask_jaccard
from subnets.masks.subnetwork import SubnetworkSet
from subnets.report.runs import BASELINE, Run, first_per_method, methods_of, role, task_record


# ---------------------------------------------------------------------------- scores
def scores(
    runs: Sequence[Run], setting: str = "fewshot", metric: str | None = None
) -> dict[tuple[str, str], dict[int, list[float]]]:
    """``(method, language) -> seed -> values`` of the target languages: the few-shot
    repetitions (``setting="fewshot"``) or the single zero-shot score (``"zeroshot"``); or of the
    training languages (``"source"``: their development scores, what the model fits), of
    ``metric`` (default: the task's primary metric, [task_record][subnets.report.runs.task_record])."""
    metric = metric or task_record(runs)["primary_metric"]
    out: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(dict)
    for run in runs:
        if setting == "fewshot":
            for code, summary in run.results.get("fewshot", {}).get("languages", {}).items():
                if all(metric in r for r in summary["runs"]):
                    out[(run.method, code)][run.seed] = [r[metric] for r in summary["runs"]]
        else:
            for code, s in run.results.get("target" if setting == "zeroshot" else "source", {}).items():
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


def parameter_budgets(runs: Sequence[Run], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per method (runs that recorded ``parameters``): trainable parameters, the mean over
    training languages of the parameters a language's steps may update, the zero-shot and
    few-shot primary metric averaged over target languages ([score_table][subnets.report.scores.score_table]'s
    average rows), and the few-shot [significance][subnets.report.scores.significance] against the baseline
    (``vs_baseline``) and against the static subnetwork's random control (``vs_control``, the method named in
    ``control``), each list Holm-adjusted over the table's methods."""
    averages = {setting: {r["method"]: r["mean"] for r in score_table(runs, setting) if r["language"] == "average"}
                for setting in ("zeroshot", "fewshot")}  # fmt: skip
    budgets = first_per_method(runs, lambda r: r.results.get("parameters"))
    control = next((r.method for r in runs if role(r.results)["control_of"] == "static"), None)
    tests = {}
    for reference in (BASELINE, control):
        pairs = [(run.method, reference) for run, _ in budgets if reference and run.method != reference]
        tests.update({(e["method"], reference): e for e in significance(runs, "fewshot", None, alpha, pairs)})
    rows = []
    for run, budget in budgets:
        updated = list(budget["updated"].values())
        rows.append({"method": run.method, "trainable": budget["trainable"],
                     "updated": float(np.mean(updated)) if updated else float(budget["trainable"]),
                     "zeroshot": averages["zeroshot"].get(run.method), "fewshot": averages["fewshot"].get(run.method),
                     "vs_baseline": tests.get((run.method, BASELINE)), "vs_control": tests.get((run.method, control)),
                     "control": control})  # fmt: skip
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
    over that seed's repetitions), tested with [wilcoxon_test][subnets.report.scores.wilcoxon_test]; p-values
    Holm-adjusted over the pairs compared."""
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
    control (the control declares it: ``method.control_of``; labelled variants included), and each labelled variant and its
    method with the default settings (``static (method.apply=both)`` against ``static``)."""
    methods = methods_of(runs)
    names = {r.method: r.results["method"] for r in runs}
    controls = {role(r.results)["control_of"]: r.method for r in runs if role(r.results)["control_of"]}
    pairs = [(m, controls[names[m]]) for m in methods if names[m] in controls]
    pairs += [(m, names[m]) for m in methods if m != names[m] and names[m] in methods]
    return pairs


def significance_statement(entry: dict[str, Any], metric: str = "LAS", alpha: float = 0.05,
                           lower_is_better: bool = False) -> str:  # fmt: skip
    """One sentence for a [significance][subnets.report.scores.significance] entry (the difference is the
    method's score minus the reference's; ``lower_is_better`` says so, as for perplexity)."""
    verdict = "significant" if entry["significant"] else "not significant"
    reference = entry.get("reference", BASELINE)
    reference = "the baseline" if reference == BASELINE else reference
    metric = f"{metric} (lower is better)" if lower_is_better else metric
    return (f"{entry['method']}: {entry['mean_gain']:+.2f} {metric} over {reference} (mean of {entry['n']} "
            f"language x seed pairs); {entry['test']} p = {entry['p']:.3g}, Holm-adjusted {entry['p_holm']:.3g}: "
            f"{verdict} at alpha = {alpha}.")  # fmt: skip


def markdown_table(rows: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """A language x method Markdown table of ``mean +- sd`` cells from
    [score_table][subnets.report.scores.score_table] rows."""
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
    ([overlap_typology_correlation][subnets.analysis.overlap_typology_correlation]). Methods whose languages
    URIEL does not know (e.g. synthetic ones) are left out."""

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
    ([chance_jaccard][subnets.masks.controls.chance_jaccard])."""
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
