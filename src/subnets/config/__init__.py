"""Structured-config schemas of the experiment runner.

The dataclasses below are registered in Hydra's ConfigStore and act as schemas: the YAML files
under ``subnets/configs`` fill them in, and a misspelt key, a wrong type or a value outside an
enumeration fails when the config is composed, with the full key in the message. The library
functions do not need Hydra; ``default_config`` gives the same tree for notebook use.
"""

from subnets.config.compose import compose_config, default_config, register_configs, run_folder_name
from subnets.config.rules import RULES, SettingError, setting, validate_config
from subnets.config.schema import *  # noqa: F403 (every schema class and enumeration)
from subnets.config.schema import TASK_SCHEMAS, Config

register_configs()  # importing the schema makes it available to Hydra's compose API

__all__ = ["RULES", "TASK_SCHEMAS", "Config", "SettingError", "compose_config", "default_config", "register_configs",
           "run_folder_name", "setting", "validate_config"]  # fmt: skip
