"""Command-line runner: ``python -m subnets.train [overrides]`` (Hydra).

Examples::

    python -m subnets.train                                   # synthetic languages, tiny model
    python -m subnets.train +method=dynamic                   # a method (configs/method/)
    python -m subnets.train +experiment=ud_fewshot            # the UD study (configs/experiment/)
    python -m subnets.train -m +method=baseline seed=1,2,3    # a multirun sweep
    python -m subnets.train --config-dir my_configs +method=my_method   # a method of your own
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from subnets.cli import REFUSALS, traceback_wanted
from subnets.config import register_configs
from subnets.training.runner import run

register_configs()
DIVERGED_EXIT_STATUS = 3
diverged: list[str] = []  # run folders of this process whose results say status: diverged


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """What Hydra itself would write into ``.hydra/``: the job's config, its overrides and
    Hydra's own config."""
    hydra_cfg = HydraConfig.get()
    return {
        ".hydra/config.yaml": OmegaConf.to_yaml(cfg),
        ".hydra/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
        ".hydra/hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
    }


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def train(cfg: DictConfig) -> Any:
    """Train and evaluate; returns the mean development score (for sweepers). A single run whose
    training loss diverged exits with status 3 once its results are written; in a sweep the
    other jobs go on, and the command exits with status 3 at the end (in-process launchers). A
    refused run (a bad setting, input or folder) logs its one-line error and exits with status 1, its traceback only with ``hydra.verbose=true`` or ``SUBNETS_TRACEBACK=1``."""
    folder = HydraConfig.get().runtime.output_dir
    try:
        results = run(cfg, folder, record=hydra_record(cfg))
    except REFUSALS:  # the runner logged its one line (on stderr and in train.log); no traceback
        if traceback_wanted() or HydraConfig.get().verbose:
            raise
        raise SystemExit(1) from None
    if results.get("status") == "diverged":
        if HydraConfig.get().mode == RunMode.RUN:
            raise SystemExit(DIVERGED_EXIT_STATUS)
        diverged.append(folder)
    return results.get("dev_metric")


def main() -> None:
    """``python -m subnets.train`` and ``subnets-train``."""
    train()
    if diverged:
        print(
            f"{len(diverged)} run(s) diverged (results.json status: diverged): {', '.join(diverged)}",
            file=sys.stderr,
        )
        raise SystemExit(DIVERGED_EXIT_STATUS)


if __name__ == "__main__":
    main()
