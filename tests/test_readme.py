"""Every command in README.md runs as written (issue 28): the quick start's two commands are the
ones .ci/run runs, and every ``python -m subnets...`` line of its code blocks runs from a fresh
folder, in order, with settings that shorten a long run (``debug=tiny``, one few-shot repetition,
small real-data caps) appended, and with the run folder the command itself would use (each in a
new process that need not import the library again: helpers.python)."""

import json
import os
import re
import shlex
import sys

import pytest
from conftest import REPO
from helpers import python
from test_shared import E5_PATH, UD_ROOT, UD_SOURCES, UD_TARGETS, needs_e5, needs_ud

from subnets.config import run_folder_name

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
COMMANDS = [line.split("  #")[0].strip() for block in BLOCKS for line in block.splitlines() if line.strip()]
SHORT = ["debug=tiny", "fewshot.repetitions=1", "fewshot.steps=1", "train.steps=6"]
REAL = ["languages.max_train_sentences=16", "languages.max_eval_sentences=4", "fewshot.k=2",
        "masks.importance_batches=2", "masks.batch_size=4", "masks.finetune_steps=0", "masks.after_steps=2", f"languages.ud_root={UD_ROOT}",
        "train.batch_size=4", "analysis.cka_sentences=4", "analysis.conflict_batch_size=2"]  # fmt: skip


def test_the_quick_start_is_what_ci_runs():
    setup, tests = COMMANDS[:2]
    assert setup.startswith("python3 -m venv .venv") and setup.endswith(
        "pip install . && python -m subnets.train"
    )
    assert tests.endswith('pip install -e ".[dev]" && python -m pytest -n auto')
    assert tests in (REPO / ".ci" / "run").read_text()  # CI calls README's test command as written
    assert setup.split(" && ")[:3] == tests.split(" && ")[:3]  # the same fresh environment and torch pin


def shortened(command: str) -> list[str]:
    """The command's arguments with the shortening settings (and the run folder of the command
    as written, so that later commands find it)."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module, arguments = words[2], words[3:]
    if module != "subnets.train":
        return [sys.executable, "-m", module, *arguments]
    extra = [*SHORT, *(REAL if "+experiment=ud_fewshot" in arguments else [])]
    if "-m" in arguments:
        return [sys.executable, "-m", module, *arguments, *extra, "hydra.sweep.dir=multirun/default"]
    folder = f"outputs/default/{run_folder_name(','.join(sorted(arguments)))}"
    return [sys.executable, "-m", module, *arguments, *extra, f"hydra.run.dir='{folder}'"]


@pytest.mark.slow
@pytest.mark.first
@pytest.mark.shared
@needs_ud
@needs_e5
def test_every_readme_command_runs_in_order(tmp_path):
    (tmp_path / "text.txt").write_text("wino lue qexy\nlue wino\n")  # README's predict input
    environment = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "SUBNETS_UD_ROOT": str(UD_ROOT),
        "SUBNETS_E5_PATH": str(E5_PATH),
    }
    commands = [c for c in COMMANDS[2:] if c.startswith("python -m subnets")]
    assert len(commands) >= 7  # methods, sweep, tasks, the UD study, evaluate, predict
    for command in commands:
        _, _, module, *arguments = shortened(command)
        done = python(module, *arguments, cwd=tmp_path, env=environment, timeout=900)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert (tmp_path / "parsed.conllu").read_text().count("\n\n") == 2  # predict wrote two parsed sentences
    assert len(list((tmp_path / "multirun" / "default").glob("*/results.json"))) == 9  # the 3 x 3 sweep
    # The UD study by its settings alone (the one run of the runner on real UD with e5-small by its
    # settings): static masks of the eight source languages, every target language of the manifest evaluated.
    study = tmp_path / "outputs" / "default" / run_folder_name("+experiment=ud_fewshot,+method=static")
    results = json.loads((study / "results.json").read_text())
    assert set(results["target"]) == UD_TARGETS and set(results["sparsity"]) == UD_SOURCES
    assert (study / "masks" / "overlap.png").exists()
