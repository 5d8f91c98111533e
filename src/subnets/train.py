"""Command-line runner: ``python -m subnets.train [overrides]`` (Hydra).

Examples::

    python -m subnets.train                                   # synthetic languages, tiny model
    python -m subnets.train +experiment=ud_e5                 # real UD, multilingual-e5-small
    python -m subnets.train -m +method=baseline seed=1,2,3    # a multirun sweep
"""

from __future__ import annotations

import hashlib
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from subnets.config import register_configs
from subnets.experiment import run


def run_folder_name(overrides: str) -> str:
    """A run folder name from Hydra's ``override_dirname``: readable, one path level, and unique
    (long names are cut and end in a hash of the whole)."""
    name = overrides.replace("/", "_") or "run"
    if len(name) > 120:
        name = f"{name[:100]}...{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


register_configs()
OmegaConf.register_new_resolver("subnets_run_name", run_folder_name, replace=True)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The runner's config for ``overrides`` (command-line syntax), without starting a run.

    For notebooks and tests; it is composed exactly as ``python -m subnets.train`` composes it.
    """
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="subnets.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> Any:
    """Train and evaluate; returns the mean development score (for sweepers)."""
    results = run(cfg, HydraConfig.get().runtime.output_dir)
    return results.get("dev_metric")


if __name__ == "__main__":
    main()
