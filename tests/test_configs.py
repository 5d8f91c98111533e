"""Every config file composes, every study combination composes, and defaults live in the schema."""

from pathlib import Path

import pytest
from conftest import REPO
from hydra.utils import instantiate
from omegaconf import OmegaConf

from subnets.config import TASK_SCHEMAS, Config, compose_config
from subnets.training.assemble import build_method

CONFIGS = REPO / "src" / "subnets" / "configs"
GROUPS = ["model", "task", "languages", "method", "experiment", "budget", "debug", "fewshot", "debug_task"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def group_override(group: str, option: str) -> list[str]:
    if group in ("method", "experiment", "fewshot"):
        return [f"+{group}={option}"]
    if group == "budget":
        return ["+experiment=ud_fewshot", f"budget={option}"]
    if group == "debug_task":  # debug_task/<debug>_<task>.yaml is chosen by debug=... and task=...
        debug, _, task = option.partition("_")
        return [f"debug={debug}", f"task={task}"]
    return [f"{group}={option}"]


def test_every_config_file_belongs_to_a_known_group():
    files = {p.relative_to(CONFIGS).parts[0] for p in CONFIGS.rglob("*.yaml") if p.name != "config.yaml"}
    assert files <= {*GROUPS, "hydra"}
    assert all(options(group) for group in GROUPS)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_file_composes_and_resolves(group, option):
    cfg = compose_config(group_override(group, option))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.languages.train


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("method", options("method"))
def test_every_experiment_and_method_compose_and_build_their_method(experiment, method):
    cfg = compose_config([f"+experiment={experiment}", f"+method={method}"])
    OmegaConf.to_container(cfg, resolve=True)
    built = build_method(cfg)
    assert built.name == method
    assert type(built.policy).__name__ == instantiate(cfg.method.policy).__class__.__name__


def yaml_leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults":
                continue
            yield from yaml_leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize(
    "path", sorted(p for p in CONFIGS.rglob("*.yaml") if "hydra" not in p.parts), ids=str
)
def test_yaml_files_set_only_what_differs_from_the_schema(path: Path):
    """A YAML value equal to the schema's default is a second copy of that default (the budget
    order bug of 247ea3f came from such copies)."""
    written = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    group = path.relative_to(CONFIGS).parts[0]
    header = path.read_text().splitlines()[:1]
    global_package = header == ["# @package _global_"] or group == "config.yaml"
    schema = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)
    root = schema if global_package else schema.get(group, {})
    if group in ("task", "debug_task"):  # a task option's schema is the one its defaults list names
        task_file = path if group == "task" else CONFIGS / "task" / f"{path.stem.partition('_')[2]}.yaml"
        (entry,) = [d for d in OmegaConf.load(task_file).defaults if str(d).startswith("/task_schema/")]
        root = OmegaConf.to_container(
            OmegaConf.structured(TASK_SCHEMAS[str(entry).split("/")[2].split("@")[0]])
        )
    restated = []
    for key, value in yaml_leaves(written):
        default = root
        for part in key.split("."):
            default = default.get(part, KeyError) if isinstance(default, dict) else KeyError
        if default is not KeyError and getattr(default, "value", default) == value:
            restated.append(key)
    # task=parsing and model=tiny select the schema's defaults; their files say so in comments.
    # A few-shot protocol (fewshot/) states every value it fixes, so that no budget changes it.
    if group == "fewshot":
        return
    assert not restated, f"{path.relative_to(CONFIGS)} restates schema defaults: {restated}"
