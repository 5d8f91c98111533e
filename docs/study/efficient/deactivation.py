"""LAPE's deactivation table on a masked-LM run of the study (issue 41, item 5): the change of each
language's masked-LM perplexity when one language's activation-selected neurons are zeroed.

    python docs/study/efficient/deactivation.py RUN [--share 0.01] [--batches 4] [--output FILE]

Two selections are zeroed, each in its own table:

- ``run``: the run's own subnetworks (its masks, e.g. a quarter of the neurons per language);
  only where the run's masks hold neurons;
- ``lape``: LAPE's share of the neurons (``--share``, 1% as in Tang et al. 2024), the lowest-entropy
  neurons of each language among those it activates often, measured on the trained model over
  ``--batches`` batches of 16 training sentences per language
  ([language_neurons][subnets.masks.activation.language_neurons], the run's
  ``masks.activation_quantile``).

Each language's perplexity is measured on ``--batches`` fixed batches of 16 development sentences
(the same masked positions in every row). Writes ``--output`` (JSON: both tables as
[deactivation_table][subnets.analysis.neurons.deactivation_table] returns them) and prints each
table, its diagonal and off-diagonal means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subnets.analysis.neurons import deactivation_table
from subnets.data.dataset import load_language
from subnets.data.discovery import discover_languages
from subnets.data.languages import data_root
from subnets.masks.activation import language_neurons
from subnets.masks.selection import select_keep_ratio
from subnets.runs.trained import load_run

SIZE = 16  # sentences per batch


def tables(folder: Path, share: float, batches: int) -> dict:
    """The run's and LAPE's deactivation tables (module docstring) of the run in ``folder``."""
    trained = load_run(folder, "best")
    model, cfg = trained.model, trained.cfg
    if "neurons" not in model.gates.units:
        raise SystemExit(f"run={folder}: its gates cover {' and '.join(model.gates.units)}; deactivation zeroes "
                         "feed-forward neurons (masks.units=neurons or both)")  # fmt: skip
    files = discover_languages(data_root(cfg.languages, folder), trained.task.suffixes)

    def fixed(code: str, split: str) -> list:
        data = trained.data(load_language(files[code], split, trained.task), code, split)
        return trained.batcher.fixed(data, SIZE, batches, "deactivation")

    evaluated = {code: fixed(code, "dev") for code in trained.languages}
    measured = language_neurons(model, {code: fixed(code, "train") for code in trained.languages},
                                cfg.masks.activation_quantile)  # fmt: skip
    lape = {
        code: select_keep_ratio(scores, share, min_per_layer=0) for code, scores in measured.scores.items()
    }
    out = {"run": str(folder), "share": share, "batches": batches, "sentences_per_batch": SIZE,
           "lape": deactivation_table(model, evaluated, lape)}  # fmt: skip
    masks = getattr(trained.method.policy, "masks", None)
    if masks is not None and "neurons" in masks.units:
        out["masks"] = deactivation_table(model, evaluated, masks)
    return out


def printed(name: str, table: dict) -> str:
    codes = table["evaluated"]
    lines = [f"{name}: perplexity change when the row's neurons are zeroed (columns: evaluated language)",
             "zeroed      neurons " + " ".join(f"{c:>9}" for c in codes),
             "(none)              " + " ".join(f"{table['baseline'][c]:9.1f}" for c in codes)]  # fmt: skip
    for row, changes in zip(table["deactivated"], table["change"]):
        lines.append(f"{row:<11} {table['neurons'][row]:7d} " + " ".join(f"{v:+9.1f}" for v in changes))
    lines.append(f"diagonal mean {table['diagonal']:+.1f}, off-diagonal mean {table['off_diagonal']:+.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run", type=Path, help="a finished masked-LM run (task=mlm) whose gates cover neurons"
    )
    parser.add_argument("--share", type=float, default=0.01, help="LAPE's share of the neurons per language")
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 sentences per language")
    parser.add_argument("--output", type=Path, default=Path("deactivation.json"))
    args = parser.parse_args()
    found = tables(args.run, args.share, args.batches)
    args.output.write_text(json.dumps(found, indent=1) + "\n")
    for name in ("masks", "lape"):
        if name in found:
            print(printed(name, found[name]), end="\n\n")


if __name__ == "__main__":
    main()
