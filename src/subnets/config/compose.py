"""Composing the runner's config as ``python -m subnets.train`` does, from Python."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from subnets.config.schema import TASK_SCHEMAS, Config, ParsingTaskConfig


def run_folder_name(overrides: str) -> str:
    """A run folder name from Hydra's ``override_dirname``: readable, one path level, unique,
    and typed in a shell as it is. A character a shell would take otherwise (``[]{}()*?$'"``,
    spaces, ...) becomes ``_`` and the name ends in a hash of the whole (``+``, ``=`` and ``,``
    stay: a shell takes them as they are); long names are cut and end in that hash too."""
    name = overrides.replace("/", "_") or "run"
    safe = re.sub(r"[^\w.,=+@%:-]", "_", name)
    if safe != name or len(safe) > 120:
        name = f"{safe[:100]}..{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


def register_configs() -> None:
    """Register the schema as ``base_config`` (named first in ``config.yaml``'s defaults) and
    the resolver that names run folders."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for name, schema in TASK_SCHEMAS.items():
        store.store(group="task_schema", name=name, node=schema)
    OmegaConf.register_new_resolver("subnets_run_name", run_folder_name, replace=True)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The runner's config for ``overrides`` (command-line syntax), without starting a run.

    For notebooks and tests; it is composed exactly as ``python -m subnets.train`` composes it::

        cfg = compose_config(["+method=dynamic", "train.steps=200"])
    """
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="subnets.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def default_config(**overrides: Any) -> DictConfig:
    """The schema's defaults as a structured ``DictConfig`` (for notebooks and tests).

    The defaults of the YAML files (e.g. the synthetic languages) are not included; compose
    with Hydra (``compose_config``) for the runner's full default.
    """
    cfg = OmegaConf.structured(Config)
    cfg.task = OmegaConf.structured(ParsingTaskConfig)
    return OmegaConf.merge(cfg, overrides) if overrides else cfg
