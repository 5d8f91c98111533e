"""Helpers that several test modules share (conftest.py holds the fixtures and the tiny configs)."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile

import torch
import torch.multiprocessing as mp

# The small job's model and data (2 layers of hidden size 64, 300 sentences per language, batches
# of 32): tests/test_methods.py's pinned job and tests/test_learning.py's longer run add their
# steps and intervals.
SMALL_MODEL_AND_DATA = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.vocab_size=2000",
    "model.tiny.max_length=128",
    "task.arc_dim=64",
    "task.label_dim=32",
    "languages.synthetic.train=300",
    "languages.synthetic.dev=50",
    "languages.synthetic.test=50",
    "train.batch_size=32",
    "train.warmup_steps=20",
]


def small_job(steps: int, interval: int, log_every: int) -> list[str]:
    """The small job for ``steps`` steps, evaluated and checkpointed every ``interval``, logged every ``log_every``."""
    return [*SMALL_MODEL_AND_DATA, f"train.steps={steps}", f"train.eval_every={interval}",
            f"train.checkpoint_every={interval}", f"train.log_every={log_every}"]  # fmt: skip


# The learning job of the tasks' tests (tests/test_tasks.py, tests/test_subnetwork_only.py): the
# small model, 300 sentences per language, 300 steps, no few-shot.
LEARN = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=2000",
         "languages.synthetic.train=300", "languages.synthetic.dev=50", "languages.synthetic.test=50",
         "train.steps=300", "train.batch_size=32", "train.warmup_steps=30", "train.eval_every=100",
         "train.checkpoint_every=100", "train.log_every=30", "fewshot.repetitions=0"]  # fmt: skip

TESTS = os.path.dirname(os.path.abspath(__file__))

# The library, imported once by the fork server of spawn(): each process it starts is a fork of a
# process that has imported these and done nothing else.
_PRELOAD = ["subnets.training.runner", "subnets.parallel.sharding", "subnets.cli.consolidate", "subnets.tasks",
            "transformers.models.bert.modeling_bert", "transformers.models.qwen2.modeling_qwen2",
            "torch.distributed.fsdp", "torch.distributed.checkpoint"]  # fmt: skip


def _in_environment(rank: int, environment: dict, function, *args) -> None:
    os.environ.clear()
    os.environ.update(environment)
    function(rank, *args)


def spawn(function, args: tuple = (), nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn(function, args, nprocs)``, each process started by a fork server
    that imported the library once (``forkserver``; ``spawn`` would import it again in each process,
    seconds each): a new process with this process's environment variables, working folder and
    ``sys.path``, the library imported and unused."""
    multiprocessing.set_forkserver_preload(_PRELOAD)
    mp.start_processes(_in_environment, args=(dict(os.environ), function, *args), nprocs=nprocs,
                       start_method="forkserver")  # fmt: skip


def _python(target: str, arguments: list[str], environment: dict, cwd: str, out: str, err: str) -> None:
    for path, fd in ((out, 1), (err, 2)):  # what a subprocess's stdout and stderr would get
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    sys.argv = [target, *arguments]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != TESTS]  # (pytest put it there)
    try:
        if target.endswith(".py"):  # python script.py: the script's folder first on sys.path
            sys.path.insert(0, os.path.dirname(target))
            runpy.run_path(target, run_name="__main__")
        else:  # python -m module
            sys.path.insert(0, cwd)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # as the interpreter does on exit


def python(target: str, *arguments: str, cwd=None, env: dict | None = None, timeout: float = 300):
    """``subprocess.run([sys.executable, target, *arguments], cwd=cwd, env={**os.environ, **env},
    capture_output=True, text=True)`` (``target`` a script's path, or a module's name as after
    ``python -m``) without starting an interpreter that imports the library again: a new process forked
    by spawn()'s fork server runs ``target`` as ``__main__`` with those arguments, environment variables
    and working folder, and ``sys.path`` as the command's (the script's folder, or the working folder for
    a module, first; not pytest's tests folder). The ``subprocess.CompletedProcess`` holds its exit
    status (a ``SystemExit`` message on stderr and 1, an uncaught exception's traceback and 1, as
    Python's own), stdout and stderr. For what a command does, not for how an interpreter starts (an
    installation, ``PYTHONPATH``, imports in a fresh interpreter): those run ``python`` itself."""
    multiprocessing.set_forkserver_preload(_PRELOAD)
    target, arguments, cwd = str(target), [str(a) for a in arguments], os.getcwd() if cwd is None else cwd
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        environment = {**os.environ, **(env or {})}
        process = multiprocessing.get_context("forkserver").Process(
            target=_python, args=(target, arguments, environment, str(cwd), out, err)
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([target, *arguments], timeout)
        with open(out) as stdout, open(err) as stderr:
            output = stdout.read(), stderr.read()
    return subprocess.CompletedProcess([target, *arguments], process.exitcode, *output)


def masked_step(run) -> tuple[str, dict, dict, dict]:
    """One training step of a set-up ``run`` whose policy holds masks, on the sampler's next language:
    the language, its parameter masks (``unit_parameter_masks``: True where its subnetwork owns a
    coordinate), and every parameter before (copies) and after the step."""
    from conftest import step_on

    from subnets.masks.subnetwork import unit_parameter_masks

    lang = run.sampler.next_language()
    owned = unit_parameter_masks(run.model, run.method.policy.masks[lang].unit_mask)
    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    step_on(run, lang)
    return lang, owned, before, dict(run.model.named_parameters())


def changed_outside(owned: dict, before: dict, after: dict) -> list[str]:
    """The masked parameters of which a coordinate outside the mask changed (none: an exact masked update)."""
    return [name for name, mask in owned.items() if not torch.equal(after[name][~mask], before[name][~mask])]


# Tiny token taggers for subnets.hf (tests/test_hf.py, tests/test_hf_save.py).
VOCAB, LENGTH = 40, 8


def tiny_tagger(layers: int = 2, seed: int = 0, dtype=torch.float32):
    """A BERT token classifier built from a config (no hub name), the same weights for the same seed in any process."""
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForTokenClassification(config).to(dtype)


def tagging_data(language: str | None, n: int, shift: int):
    """``n`` rows of tokens whose tag is (token + shift) mod 3: languages that disagree about every token."""
    import datasets

    generator = torch.Generator().manual_seed(shift + 7)
    ids = torch.randint(5, VOCAB, (n, LENGTH), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * LENGTH] * n,
                                       "labels": ((ids + shift) % 3).tolist(), "language": [language] * n})  # fmt: skip


def tagging_languages(n: int) -> dict:
    """Two tagging languages of ``n`` rows each, ``de`` (shift 0) and ``fr`` (shift 1)."""
    return {"de": tagging_data("de", n, 0), "fr": tagging_data("fr", n, 1)}
