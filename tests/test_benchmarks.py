"""Every script under benchmarks/ runs at its smallest setting (``--smoke``, seconds each) and
prints its figures; one that needs ../shared and cannot find it says which variable to set.
The figures' values are timings of a loaded machine: only their lines' shape is checked."""

import re

import pytest
from conftest import REPO
from helpers import python
from test_shared import E5_PATH, UD_ROOT, needs_e5, needs_ud

BENCHMARKS = REPO / "benchmarks"
N = r"[-+]?\d+(?:\.\d+)?"  # a figure
# script -> (the marks it needs, a pattern of its figure lines, how many such lines)
SMOKE = {
    "data_cache": ([needs_ud, needs_e5], rf"^  (no|cold|warm) cache +{N} s", 3),
    "fewshot_step": ([needs_ud], rf"^ +0( +{N}){{7}}$|^all repetitions: micro-batched / one batch {N}$", 2),
    "hf_wrapper": ([], rf"^(unwrapped|one language|mixed languages|AdamW step|masked step \(2 languages\)) +{N} +{N}$", 5),
    "mask_reliability": ([needs_ud], rf"^\S.* jaccard {N} \(min {N}; chance {N}\)  spearman {N}  seconds +{N}", 9),
    "masked_optimizer": ([], rf"^qwen2 +14 +{N} +{N} +{N}$", 1),
    "meta_step": ([needs_ud], rf"^tiny \| first \| subnets \| {N} \| {N} \|", 1),
    "method_step": ([], rf"^tiny( +{N}){{4}}$", 1),
    "sharding_memory": ([], rf"^(ddp|fsdp) +[01]( +{N}){{5}}$|^fsdp / ddp, bytes held per rank .*: {N} |^\S+B .* (yes|no) / (yes|no)$", 8),
    "subnetwork_memory": ([], rf"^(qwen2|e5) +(subnetwork|lora|shira|full) +\d+( +({N}|nan)){{8}}$|^goal (qwen2|e5): .*: ({N}|nan) "
                          rf"(PASS|MISS)$|^(Qwen2-7B|Llama-3.1-8B) +(subnetwork|lora r=\d+|full) +{N}B +{N}M +{N} +{N} +(yes|no) / (yes|no)$", 20),
    "task_step": ([], rf"^(parsing|pos|ner|classification|mlm|clm) +tiny +{N} +{N} +\w+ +{N}$", 6),
    "train_step": ([needs_ud], rf"^tiny +\S+ +\S.* +({N}|skipped)( +<= {N})?$", 16),
}  # fmt: skip


def run(script: str, *arguments, cwd, env=None, timeout=300):
    """``python benchmarks/<script>.py arguments`` in a new process (helpers.python: one that need not
    import torch and the library again)."""
    return python(BENCHMARKS / f"{script}.py", *arguments, cwd=cwd, timeout=timeout,
                  env={"OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


def test_every_benchmark_has_a_smoke_run():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - {"shared_paths"}
    assert scripts == set(SMOKE)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", [pytest.param(name, marks=[*needs, pytest.mark.shared] if needs else [])
               for name, (needs, _, _) in SMOKE.items()]
)  # fmt: skip
def test_a_benchmark_runs_at_its_smallest_setting_and_prints_its_figures(script, tmp_path):
    shared = {"SUBNETS_UD_ROOT": str(UD_ROOT), "SUBNETS_E5_PATH": str(E5_PATH)}
    done = run(script, "--smoke", cwd=tmp_path, env=shared)
    assert done.returncode == 0, done.stderr[-3000:]
    _, pattern, count = SMOKE[script]
    figures = [line for line in done.stdout.splitlines() if re.search(pattern, line)]
    assert len(figures) == count, done.stdout


@pytest.mark.slow
def test_a_benchmark_without_the_shared_data_names_the_variable_to_set(tmp_path):
    done = run("fewshot_step", "--smoke", cwd=tmp_path, env={"SUBNETS_UD_ROOT": str(tmp_path / "nowhere")})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"UD treebanks not found at {tmp_path / 'nowhere'}: set SUBNETS_UD_ROOT to a folder of UD treebanks"
    )
    done = run("hf_wrapper", "--model", "e5", cwd=tmp_path, env={"SUBNETS_E5_PATH": str(tmp_path / "e5")})
    assert done.returncode == 1 and "Repo id" not in done.stderr
    assert f"multilingual-e5-small not found at {tmp_path / 'e5'}: set SUBNETS_E5_PATH" in done.stderr
