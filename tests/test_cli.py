"""The command line: a single run and its resume, the launchers' multiruns and a non-editable install as
subprocesses; refusals and in-process multiruns in a process that need not import the library again
(helpers.python)."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, TINY
from helpers import python
from hydra import compose, initialize_config_module

from subnets.config import run_folder_name


def cli(*args, cwd, env=None, timeout=300):
    environment = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "subnets.train", *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def forked_cli(*args, cwd, env=None, timeout=300):
    """cli(), in a process forked from one that imported the library (helpers.python)."""
    environment = {"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", **(env or {})}
    return python("subnets.train", *args, cwd=cwd, env=environment, timeout=timeout)


def test_single_run_in_its_folder_named_by_overrides_prints_las_writes_outputs_and_resumes(tmp_path):
    done = cli(*TINY, "seed=5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = list((tmp_path / "outputs" / "default").iterdir())
    assert len(folders) == 1
    with initialize_config_module(config_module="subnets.configs", version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=[*TINY, "seed=5"], return_hydra_config=True)
    overrides = hydra_cfg.hydra.job.override_dirname
    assert "seed=5" in overrides and "wandb.mode" not in overrides  # excluded: does not change results
    run_dir = folders[0]
    assert run_dir.name == run_folder_name(overrides)
    assert "LAS" in done.stdout and "syn_vos" in done.stdout
    for name in [
        ".hydra/config.yaml",
        "results.json",
        "metrics.jsonl",
        "checkpoints/last.safetensors",
        "train.log",
    ]:
        assert (run_dir / name).exists(), name
    results = json.loads((run_dir / "results.json").read_text())
    # the printed table holds the LAS of results.json
    assert f"{results['target']['syn_vos']['las']:.2f}" in done.stdout
    best = results["source_best"]
    assert f"best ({best['language']})" in done.stdout and f"{best['las']:.2f}" in done.stdout
    assert f"{results['source_mean']['las']:.2f}" in done.stdout

    again = cli(*TINY, "seed=5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout + again.stderr
    assert json.loads((run_dir / "results.json").read_text()) == results


def test_run_folder_names_are_single_unique_path_levels():
    assert run_folder_name("") == "run"
    assert run_folder_name("+method=static,seed=2") == "+method=static,seed=2"
    assert run_folder_name("masks.path=a/b") == "masks.path=a_b"
    long_a, long_b = "x=1," * 60 + "seed=1", "x=1," * 60 + "seed=2"
    assert run_folder_name(long_a) != run_folder_name(long_b)
    assert len(run_folder_name(long_a)) <= 120
    # characters a shell would expand or split on are replaced, and the name stays unique
    lists = [run_folder_name(f"languages.train=[{codes}]") for codes in ("en,it", "en_it", "en it")]
    assert len(set(lists)) == 3 and all(re.fullmatch(r"[\w.,=+@%:-]+", name) for name in lists), lists
    assert lists[0].startswith("languages.train=_en,it_..")
    assert run_folder_name("a='b c'") != run_folder_name("a=_b_c_")


def test_a_refused_run_prints_its_one_line_error_without_a_traceback(tmp_path):
    refused_settings = [*TINY, "+method=maml", "train.batches=mixed", f"hydra.run.dir={tmp_path / 'run'}"]
    refused = forked_cli(*refused_settings, cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    message = "train.batches=mixed: MAML episodes draw a batch per language"
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert [line for line in refused.stderr.splitlines() if message in line] == [refused.stderr.strip()]
    verbose = forked_cli(*refused_settings, "hydra.verbose=true", cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and message in verbose.stderr


def test_multirun_sweep_gives_one_folder_per_job_and_a_rerun_overwrites_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", *TINY, "+method=baseline", "seed=1,2", f"hydra.sweep.dir={sweep}")
    done = forked_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = sorted(sweep.glob("*/results.json"))
    results = [json.loads(p.read_text()) for p in paths]
    assert len(results) == 2  # one folder per job
    by_seed = {r["seed"]: r for r in results}
    assert sorted(by_seed) == [1, 2]
    assert by_seed[1]["source"] != by_seed[2]["source"]
    # a rerun finds each job finished and writes nothing (the check is in run, whatever the launcher)
    written = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    again = forked_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths} == written
    for path in paths:  # each job said so in its log
        assert "already finished" in (path.parent / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "slurm_local"])
def test_launcher_sweep_runs_every_job_in_its_own_folder(tmp_path, launcher):
    """Each launcher runs every job of a sweep in its own folder (a rerun's check is in ``run``,
    whatever the launcher: test_multirun_sweep_gives_one_folder_per_job_and_a_rerun_overwrites_nothing)."""
    sweep = tmp_path / "sweep"
    # A real interpreter: the launchers start worker processes (joblib's loky, submitit) whose idle
    # executors a forked helpers.python process would wait on at exit until its timeout.
    done = cli("-m", f"hydra/launcher={launcher}", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
               timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    paths = sorted(sweep.glob("*/results.json"))
    assert sorted(json.loads(p.read_text())["seed"] for p in paths) == [1, 2]


def test_misspelt_setting_fails_with_its_name(tmp_path):
    done = forked_cli("train.stepz=3", cwd=tmp_path)
    assert done.returncode != 0
    assert "stepz" in done.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("results.json"))


def test_non_editable_install_runs_outside_the_repository(tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "subnets" / "configs" / "config.yaml").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import subnets; print(subnets.__file__)"],
        cwd=work, env={**os.environ, **env}, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    done = cli(*TINY, "train.steps=4", "+method=baseline", cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((work / "outputs").rglob("results.json"))


@pytest.mark.parametrize(
    "group", ["model=e5_small", "model=mbert", "model=xlmr_base", "languages=ud", "task=pos"]
)
def test_every_group_option_composes(group):
    from conftest import tiny_config

    cfg = tiny_config(group)
    assert cfg.model.name_or_path and cfg.languages.train


@pytest.mark.parametrize("budget", ["cpu", "paper"])
@pytest.mark.parametrize("method", ["baseline", "static", "dynamic", "maml", "maml_static", "maml_dynamic"])
def test_study_budget_sets_its_values_whatever_the_order_of_the_groups(method, budget):
    from omegaconf import OmegaConf

    first = compose_overrides("+experiment=ud_fewshot", f"+method={method}", f"budget={budget}")
    second = compose_overrides(f"+method={method}", "+experiment=ud_fewshot", f"budget={budget}")
    assert first == second
    written = OmegaConf.load(REPO / "src" / "subnets" / "configs" / "budget" / f"{budget}.yaml")
    for key, value in OmegaConf.to_container(written).items():
        if isinstance(value, dict):
            for name, setting in value.items():
                actual = first[key][name]
                assert getattr(actual, "value", actual) == setting, f"{key}.{name}"
        else:
            assert first[key] == value
    assert list(first.languages.target) == ["auto"] and first.method.name == method


def compose_overrides(*overrides):
    with initialize_config_module(config_module="subnets.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
