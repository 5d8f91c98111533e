"""The runs of a study: their folders, methods (and the report roles they declare), seeds and results."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subnets.runs.results import task_of

BASELINE = "baseline"  # the method every other is compared with


def role(results: dict[str, Any]) -> dict[str, Any]:
    """A run's report role as its method declared it (``method.report_order``,
    ``method.control_of``; results.json ``method_role``): where it goes in tables, and which
    method it is the random control of."""
    return {"order": 1000, "control_of": None, **results.get("method_role", {})}


@dataclass
class Run:
    """One finished run: its folder, method label (the method's name, and the settings that set
    it apart from the other runs of that method in the folder), seed and ``results.json``."""

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
    ordered by method (the order each method declares, [role][subnets.report.runs.role]) and seed. Raises
    FileNotFoundError when none is found."""
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
    labels = [method_label(run, runs) for run in runs]
    for run, label in zip(runs, labels):
        run.method = label
    return sorted(runs, key=lambda r: (role(r.results)["order"], r.method, r.seed))


def method_label(run: Run, runs: Sequence[Run], ignore: str | None = None) -> str:
    """The run's method and the settings that tell it from the other runs of that method in ``runs``
    (a rate, a variant), the setting ``ignore`` aside; settings every run of the method shares are left out."""
    method = run.results["method"]
    same = [r for r in runs if r.results["method"] == method]
    differing = [s for s in run.settings
                 if not all(s in r.settings for r in same) and s.partition("=")[0].lstrip("+") != ignore]  # fmt: skip
    return method + (f" ({', '.join(differing)})" if differing else "")


def _settings(folder: Path) -> tuple[str, ...]:
    """The run's command-line overrides (``.hydra/overrides.yaml``) but its method, its seed and
    the settings that do not change results (``resume``, ``overwrite``)."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ()
    from omegaconf import OmegaConf

    overrides = [str(o) for o in OmegaConf.load(path)]
    return tuple(
        sorted(
            o
            for o in overrides
            if o.split("=")[0].lstrip("+~") not in ("method", "seed", "resume", "overwrite")
        )
    )


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


def task_record(runs: Sequence[Run]) -> dict[str, Any]:
    """The task the runs share (results.json ``task``: name, metrics, primary metric); runs of
    different tasks cannot be compared in one report."""
    tasks = {task_of(r.results)["name"] for r in runs}
    if len(tasks) > 1:
        raise ValueError(
            f"the runs are of different tasks ({', '.join(sorted(tasks))}); report each task's runs apart"
        )
    return task_of(runs[0].results)
