"""Results of a run as plain-text tables (what ``python -m subnets.train`` prints last)."""

from __future__ import annotations

from typing import Any

LEGACY_METRICS = ("uas", "las", "upos")  # results.json of versions that did not record the task


def task_of(results: dict[str, Any]) -> dict[str, Any]:
    """The task record of a results.json (its name, metrics, primary metric and count key)."""
    task = results.get("task")
    if task:
        return task
    return {"name": "parsing", "metrics": list(LEGACY_METRICS), "primary_metric": "las", "count": "words",
            "lower_is_better": False}  # fmt: skip


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of the per-language scores in ``results`` (the task's metrics), then
    the few-shot table (primary metric first)."""
    task = task_of(results)
    metrics, count = list(task["metrics"]), task["count"]
    rows = []
    for role in ("source", "dev", "target"):
        for code, s in results.get(role, {}).items():
            rows.append((code, role, s["split"], str(s[count]), *(_cell(s, k) for k in metrics)))
    for role in ("source", "dev", "target"):
        if f"{role}_mean" in results:
            mean = results[f"{role}_mean"]
            rows.append(("mean", role, "", "", *(_cell(mean, k) for k in metrics)))
    if "source_best" in results:
        best = results["source_best"]
        rows.append((f"best ({best['language']})", "source", "", "", *(_cell(best, k) for k in metrics)))
    lines = _table(("language", "role", "split", count, *(k.upper() for k in metrics)), rows)
    if results.get("status") == "diverged":
        since = results.get("divergence", {}).get("since_step", "?")
        lines = [f"DIVERGED: the training loss diverged from step {since} to the end (results.json status: "
                 "diverged); these are the scores of a diverged run", *lines]  # fmt: skip
    fewshot = results.get("fewshot", {})
    if fewshot.get("languages"):
        lines += ["", f"few-shot: k={fewshot['k']} support examples, {fewshot['steps']} steps, "
                      f"{fewshot['repetitions']} repetitions (mean +- sd)"]  # fmt: skip
        primary = task["primary_metric"]
        first = next(iter(fewshot["languages"].values()))
        keys = [k for k in [primary, *metrics] if f"{k}_mean" in first]
        keys = list(dict.fromkeys(keys))
        rows = []
        for code, s in fewshot["languages"].items():
            zero = results["target"][code]
            rows.append((code, *(_cell(zero, k) for k in keys),
                         *(f"{s[f'{k}_mean']:.2f} +- {s[f'{k}_sd']:.2f}" for k in keys), s["support_split"]))  # fmt: skip
        mean = fewshot["mean"]
        rows.append(
            ("mean", *(_cell(results["target_mean"], k) for k in keys), *(f"{mean[k]:.2f}" for k in keys), "")
        )
        header = ("language", *(f"zero-shot {k.upper()}" for k in keys), *(f"few-shot {k.upper()}" for k in keys),
                  "support from")  # fmt: skip
        lines += _table(header, rows)
    return "\n".join(lines)


def _cell(scores: dict[str, Any], key: str) -> str:
    return f"{scores[key]:.2f}" if key in scores else "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
