"""The positive control's summary: mean source LAS per method and condition over seeds, the gaps
to the baseline and to the random control, and the figure (positive_control.png).

    python docs/positive_control/figure.py multirun/positive_control docs/positive_control
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

METHODS = ["baseline", "random", "static", "dynamic"]


def condition(overrides: list[str]) -> str:
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    overlap = float(values.get("languages.synthetic.languages.pc_ovs.overlap", 1.0))
    hidden = int(values.get("model.tiny.hidden_size", 32))
    return f"overlap {overlap:.1f}, hidden {hidden}"


def main(folder: Path, out: Path) -> None:
    table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for results_path in sorted(folder.glob("*/results.json")):
        results = json.loads(results_path.read_text())
        overrides = (results_path.parent / ".hydra" / "overrides.yaml").read_text().split("\n")
        overrides = [line.lstrip("- ").strip() for line in overrides if line.strip()]
        las = [s["las"] for s in results["source"].values()]
        table[(condition(overrides), results["method"])][results["seed"]] = float(np.mean(las))
    conditions = sorted({c for c, _ in table}, key=lambda c: (c.split(",")[1], c))
    lines = [
        "| condition | method | seeds | mean source LAS | vs baseline | vs random |",
        "|---|---|---|---|---|---|",
    ]
    for c in conditions:
        for method in METHODS:
            by_seed = table.get((c, method))
            if not by_seed:
                continue
            values = list(by_seed.values())
            cells = []
            for reference in ("baseline", "random"):
                other = table.get((c, reference), {})
                paired = [by_seed[s] - other[s] for s in by_seed if s in other]
                if method == reference or not paired:
                    cells.append("-")
                    continue
                p = stats.ttest_1samp(paired, 0.0).pvalue if len(paired) > 1 else float("nan")
                wins = sum(d > 0 for d in paired)
                cells.append(
                    f"{np.mean(paired):+.2f} ({wins}/{len(paired)} seeds better, paired t p = {p:.2g})"
                )
            lines.append(f"| {c} | {method} | {len(values)} | {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} | "
                         f"{cells[0]} | {cells[1]} |")  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        means = [
            np.mean(list(table[(c, method)].values())) if (c, method) in table else np.nan for c in conditions
        ]
        sds = [
            np.std(list(table[(c, method)].values()), ddof=1) if (c, method) in table else np.nan
            for c in conditions
        ]
        axis.bar(
            np.arange(len(conditions)) + (i - 1.5) * width, means, width, yerr=sds, label=method, capsize=2
        )
    axis.set_xticks(range(len(conditions)), [c.replace(", ", "\n") for c in conditions])
    axis.set_ylabel("mean source LAS (dev)")
    axis.set_ylim(80, 100)
    axis.set_title("Positive control: two languages, same strings, swapped subject/object")
    axis.legend(ncol=4, fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "positive_control.png", dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
