"""Learning rates chosen per method from a sweep, on the training languages' development sets.

A sparse or low-rank method compared at full fine-tuning's rate is not a fair comparison, so a study
sweeps each method's rate (``-m +method=lora,static train.lr_encoder=1e-5,1e-4,1e-3 seed=1``) and
continues each at the rate its source languages' development score prefers, never at the one its
target languages would: [rate_sweep][subnets.report.rates.rate_sweep] holds each method's scores per
rate, [chosen_rates][subnets.report.rates.chosen_rates] the rate picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean

from subnets.report.runs import Run, method_label, task_record

RATE = "train.lr_encoder"


def _set_rate(run: Run, setting: str) -> float | None:
    """The rate a run's command line set (None: it used the default)."""
    for override in run.settings:
        name, _, value = override.partition("=")
        if name.lstrip("+") == setting:
            return float(value)
    return None


def _rate(run: Run, setting: str) -> float | None:
    """The rate a run trained with: its command line's, or the default its recorded config holds
    (``.hydra/config.yaml``; None without one)."""
    rate = _set_rate(run, setting)
    config = run.path / ".hydra" / "config.yaml"
    if rate is None and config.exists():
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.load(config), setting)
        rate = None if value is None else float(value)
    return rate


def rate_sweep(runs: Sequence[Run], setting: str = RATE) -> dict[str, dict[float, list[float]]]:
    """Method (labelled by its other settings) -> rate -> the mean primary metric of the training
    languages' development sets (results.json ``source``), one value per seed. A method is in the
    sweep when its command lines set ``setting``; its runs at the default rate count at that rate."""
    methods = {r.results["method"] for r in runs if _set_rate(r, setting) is not None}
    rated = [(r, _rate(r, setting)) for r in runs if r.results["method"] in methods]
    rated = [(run, rate) for run, rate in rated if rate is not None]
    if not rated:
        return {}
    swept = [run for run, _ in rated]
    primary = task_record(swept)["primary_metric"]
    out: dict[str, dict[float, list[float]]] = {}
    for run, rate in rated:
        by_rate = out.setdefault(method_label(run, swept, ignore=setting), {})
        development = [scores[primary] for scores in run.results["source"].values()]
        by_rate.setdefault(rate, []).append(mean(development))
    return {method: dict(sorted(by_rate.items())) for method, by_rate in out.items()}


def chosen_rates(runs: Sequence[Run], setting: str = RATE) -> dict[str, float]:
    """Method -> the rate of [rate_sweep][subnets.report.rates.rate_sweep] with the best mean development
    score (the highest, or the lowest for a metric where lower is better); a tie goes to the smaller rate."""
    sweep = rate_sweep(runs, setting)
    return _chosen(sweep, bool(sweep) and task_record(runs).get("lower_is_better", False))


def _chosen(sweep: dict[str, dict[float, list[float]]], lower_is_better: bool) -> dict[str, float]:
    sign = 1 if lower_is_better else -1
    return {method: min(by_rate, key=lambda rate: (sign * mean(by_rate[rate]), rate))
            for method, by_rate in sweep.items()}  # fmt: skip


def rate_table(runs: Sequence[Run], setting: str = RATE) -> list[str]:
    """Markdown lines: the sweep's development scores (method x rate, mean over seeds), the chosen rate in
    bold and last; no lines for runs that sweep no rate."""
    sweep = rate_sweep(runs, setting)
    if not sweep:
        return []
    task = task_record(runs)
    chosen = _chosen(sweep, task.get("lower_is_better", False))
    rates = sorted({rate for by_rate in sweep.values() for rate in by_rate})
    primary = task["primary_metric"].upper()
    lines = [f"| method | {' | '.join(f'{setting}={rate:g}' for rate in rates)} | chosen |",
             "|---" * (len(rates) + 2) + "|"]  # fmt: skip
    for method, by_rate in sweep.items():
        cells = []
        for rate in rates:
            cell = f"{mean(by_rate[rate]):.2f}" if rate in by_rate else "-"
            cells.append(f"**{cell}**" if rate == chosen[method] else cell)
        lines.append(f"| {method} | {' | '.join(cells)} | {chosen[method]:g} |")
    return [f"Mean {primary} of the training languages' development sets (mean over the seeds run at each rate); "
            "the rate chosen is the best one's, never the target languages'.", "", *lines]  # fmt: skip
