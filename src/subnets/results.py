"""Results of a run as plain-text tables (what ``python -m subnets.train`` prints last)."""

from __future__ import annotations

from typing import Any


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of the per-language scores in ``results``."""
    rows = []
    for role in ("source", "dev", "target"):
        for code, s in results.get(role, {}).items():
            rows.append(
                (
                    code,
                    role,
                    s["split"],
                    str(s["words"]),
                    *(f"{s[k]:.2f}" if k in s else "-" for k in ("uas", "las", "upos")),
                )
            )
    for role in ("dev", "target"):
        if f"{role}_mean" in results:
            mean = results[f"{role}_mean"]
            rows.append(
                (
                    "mean",
                    role,
                    "",
                    "",
                    *(f"{mean[k]:.2f}" if k in mean else "-" for k in ("uas", "las", "upos")),
                )
            )
    header = ("language", "role", "split", "words", "UAS", "LAS", "UPOS")
    lines = _table(header, rows)
    if results.get("status") == "diverged":
        since = results.get("divergence", {}).get("since_step", "?")
        lines = [f"DIVERGED: the training loss diverged from step {since} to the end (results.json status: "
                 "diverged); these are the scores of a diverged run", *lines]  # fmt: skip
    fewshot = results.get("fewshot", {})
    if fewshot.get("languages"):
        lines += ["", f"few-shot: k={fewshot['k']} support sentences, {fewshot['steps']} steps, "
                      f"{fewshot['repetitions']} repetitions (mean +- sd)"]  # fmt: skip
        keys = [k for k in ("las", "uas", "upos") if f"{k}_mean" in next(iter(fewshot["languages"].values()))]
        rows = []
        for code, s in fewshot["languages"].items():
            zero = results["target"][code]
            rows.append((code, *(f"{zero[k]:.2f}" for k in keys),
                         *(f"{s[f'{k}_mean']:.2f} +- {s[f'{k}_sd']:.2f}" for k in keys), s["support_split"]))  # fmt: skip
        mean = fewshot["mean"]
        rows.append(
            (
                "mean",
                *(f"{results['target_mean'][k]:.2f}" for k in keys),
                *(f"{mean[k]:.2f}" for k in keys),
                "",
            )
        )
        header = (
            "language",
            *(f"zero-shot {k.upper()}" for k in keys),
            *(f"few-shot {k.upper()}" for k in keys),
            "support from",
        )
        lines += _table(header, rows)
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
