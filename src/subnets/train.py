"""Command-line runner: ``python -m subnets.train [overrides]`` (Hydra).

Examples::

    python -m subnets.train                                   # synthetic languages, tiny model
    python -m subnets.train +method=dynamic                   # a method (configs/method/)
    python -m subnets.train +experiment=ud_fewshot            # the UD study (configs/experiment/)
    python -m subnets.train -m +method=baseline seed=1,2,3    # a multirun sweep
    python -m subnets.train --config-dir my_configs +method=my_method   # a method of your own
"""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subnets.config import register_configs
from subnets.runner import run

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> Any:
    """Train and evaluate; returns the mean development score (for sweepers)."""
    results = run(cfg, HydraConfig.get().runtime.output_dir)
    return results.get("dev_metric")


if __name__ == "__main__":
    main()
