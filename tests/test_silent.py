"""Nothing wrong in silence (issue 26): a diverged run, the wrong checkpoint, a destroyed input, a
truncated cache, two runs in one folder, a mis-declared layout. Each test is a case an audit
found giving a wrong result or losing data without a word."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY, scores, tiny_config
from helpers import python

from subnets.data.hf import read_dataset_split
from subnets.data.treebank import ConlluError
from subnets.runs.folder import RunFolder, RunFolderInUse
from subnets.runs.trained import evaluate_run, load_run
from subnets.training.guards import DivergenceGuard
from subnets.training.runner import run


def cli(module, *args, cwd=None):
    """``python -m module args``, in a process that need not import the library again (helpers.python)."""
    return python(module, *args, cwd=cwd, env={"WANDB_MODE": "disabled"})


# ---------------------------------------------------------------- 1. divergence from the start
def test_the_first_steps_loss_is_the_reference_so_a_run_diverged_from_its_first_interval_is_flagged():
    old_rule = DivergenceGuard(factor=10.0, patience=3)  # no first-step loss: the best interval only
    assert not old_rule.check(20, 1e10)  # the first interval sets the reference: never flagged
    guard = DivergenceGuard(factor=10.0, patience=3)
    guard.observe(5.0)  # step 1: the untrained model's loss
    assert guard.check(20, 1e10) and guard.check(40, 4e9)
    assert guard.in_a_row == 2 and not guard.exhausted and guard.diverging
    assert "10 x the first step's loss 5" in guard.describe()
    assert not guard.observe(49.0) and guard.observe(51.0)  # a step above 10 x the first one is a spike


def test_a_run_that_diverges_from_its_first_interval_ends_diverged_loudly_with_exit_status_3(tmp_path):
    """Two log intervals, patience 3: the guard cannot stop the run, so the result must say it."""
    folder = tmp_path / "run"
    done = cli("subnets.train", *TINY, "train.steps=6", "train.lr_encoder=10", "train.lr_head=10",
               "fewshot.repetitions=0", f"hydra.run.dir={folder}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "diverged" and results["diverging_log_intervals"] == 2
    assert results["divergence"]["since_step"] == 3
    assert done.stdout.splitlines()[0].startswith("DIVERGED: the training loss diverged from step 3")
    assert "the run ended with its training loss diverging" in (folder / "train.log").read_text()


def test_a_healthy_run_says_status_ok(tmp_path):
    results = run(tiny_config("fewshot.repetitions=0"), tmp_path)
    assert results["status"] == "ok" and results["diverging_log_intervals"] == 0


# ---------------------------------------------------------------- 2, 3. which checkpoint; errors naming files
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_config("fewshot.repetitions=0"), folder)
    return folder


def copy_of(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_missing_best_checkpoint_is_refused_and_last_is_used_only_when_asked(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    (folder / "checkpoints" / "best.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"best.safetensors is missing, although the run selected its "
                                                r"model at step \d+ .*pass checkpoint=last"):  # fmt: skip
        load_run(folder)
    done = cli("subnets.evaluate", f"run={folder}")
    assert done.returncode == 1 and "best.safetensors is missing" in done.stderr
    assert not (folder / "evaluations").exists()
    evaluated = cli("subnets.evaluate", f"run={folder}", "checkpoint=last")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    last = folder / "checkpoints" / "last.safetensors"
    assert f"evaluated {last} (step 12)" in evaluated.stdout
    results = json.loads((folder / "evaluations" / "checkpoint=last" / "results.json").read_text())
    assert results["evaluated"]["checkpoint"] == str(last) and results["evaluated"]["step"] == 12


def test_a_missing_last_checkpoint_of_a_finished_run_is_named_as_missing(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    (folder / "checkpoints" / "last.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"last.safetensors is missing, although the run finished .*"
                                                r"checkpoint=best uses"):  # fmt: skip
        load_run(folder, "last")
    assert load_run(folder).checkpoint.name == "best.safetensors"  # best needs no last checkpoint


def test_an_edited_run_json_names_the_file_and_the_setting(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    path = folder / "run.json"
    identity = json.loads(path.read_text())
    identity["config"]["model"]["tiny"]["hidden_size"] = 64
    path.write_text(json.dumps(identity))
    with pytest.raises(ValueError) as error:
        load_run(folder)
    message = str(error.value)
    assert "best.safetensors does not fit the model" in message and str(path) in message
    assert "model.tiny.hidden_size: 32 -> 64" in message and "has shape [" in message


def test_a_truncated_run_json_names_the_file(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    path = folder / "run.json"
    path.write_text(path.read_text()[:300])
    with pytest.raises(
        ValueError, match=rf"{path} \(the run's identity\) is not valid JSON at line \d+ column"
    ):
        load_run(folder)
    with pytest.raises(ValueError, match=r"run.json \(the run's identity\) is not valid JSON"):
        run(tiny_config("fewshot.repetitions=0"), folder)  # a resume reads it too


# ---------------------------------------------------------------- 4. an output that destroys its input
@pytest.mark.parametrize("kind", ["conllu", "text"])
def test_parse_refuses_to_write_over_its_input_before_loading_the_model(finished, tmp_path, kind):
    source = finished / "data" / "syn_svo" / "dev.conllu"
    path = tmp_path / f"input.{kind}"
    if kind == "conllu":
        shutil.copy(source, path)
    else:
        path.write_text("wino lue qexy\nlue wino\n")
    before = path.read_bytes()
    os.link(path, tmp_path / "hard-link")
    for output in (path, tmp_path / "." / path.name, tmp_path / "hard-link"):
        done = cli("subnets.parse", f"run={finished}", f"input={path}", f"output={output}")
        assert done.returncode == 1 and f"output={output} is the input file" in done.stderr, done.stderr
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="is the input file"):
        load_run(finished).parse_file(path, path)
    assert path.read_bytes() == before


def test_an_output_that_cannot_be_written_is_refused_at_start_naming_output(finished, tmp_path, monkeypatch):
    import subnets.cli.predict

    source = finished / "data" / "syn_svo" / "dev.conllu"
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "locked" if os.geteuid() else "/proc/self"  # root may write anywhere else
    if os.geteuid():
        (tmp_path / "locked").mkdir(mode=0o500)
    monkeypatch.setattr(subnets.cli.predict, "load_run", lambda *a, **k: pytest.fail("the model was loaded"))
    for output, message in ((tmp_path / "a-file" / "out.conllu", "a-file is a file"),
                            (f"{unwritable}/out.conllu", "is not writable"),
                            (tmp_path, "is a folder")):  # fmt: skip
        with pytest.raises(OSError if "writable" in message else ValueError, match=rf"output=.*{message}"):
            subnets.cli.predict.predict_command([f"run={finished}", f"input={source}", f"output={output}"])


# ---------------------------------------------------------------- 5. the data cache
def arrow_files(cache):
    return sorted(p for p in (cache / "parsed").rglob("*.arrow"))


def test_a_truncated_cache_entry_is_found_and_rebuilt_with_a_warning(tmp_path, caplog):
    cache = tmp_path / "cache"
    reference = run(tiny_config("fewshot.repetitions=0", f"languages.cache_dir={cache}"), tmp_path / "first")
    files = arrow_files(cache)
    assert files
    for file in files:  # cut every parsed file at half its bytes (the audit's case: rows silently missing)
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="subnets.data.cache"):
        again = run(tiny_config("fewshot.repetitions=0", f"languages.cache_dir={cache}"), tmp_path / "second")
    assert scores(again) == scores(reference)
    assert caplog.text.count("is damaged") >= len(files) and "rewriting it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="subnets.data.cache"):
        run(tiny_config("fewshot.repetitions=0", f"languages.cache_dir={cache}"), tmp_path / "third")
    assert "is damaged" not in caplog.text  # rewritten whole


def test_a_cache_entry_missing_rows_at_a_batch_boundary_is_found(tmp_path, ud_root, caplog):
    """A record batch cut off whole: the arrow file still reads, with fewer rows."""
    import pyarrow as pa

    from subnets.data.cache import DataCache
    from subnets.tasks import Parsing

    cache = DataCache(tmp_path / "cache")
    path = ud_root / "syn_svo" / "train.conllu"
    file = cache.read(path, "raise", Parsing().read, "conllu")
    (arrow,) = arrow_files(tmp_path / "cache")
    table = pa.ipc.open_stream(arrow.read_bytes()).read_all()  # in memory, not mapped: the file is rewritten
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, len(table) // 2))  # a valid file holding half the rows
    with caplog.at_level(logging.WARNING, logger="subnets.data.cache"):
        again = cache.read(path, "raise", Parsing().read, "conllu")
    assert "is damaged" in caplog.text
    assert [s.forms for s in again.examples] == [s.forms for s in file.examples]


def test_a_cache_that_cannot_be_written_warns_and_its_folders_follow_the_umask(
    tmp_path, ud_root, caplog, monkeypatch
):
    from subnets.data.cache import DataCache
    from subnets.tasks import Parsing

    previous = os.umask(0o002)  # a group-shared cache
    try:
        DataCache(tmp_path / "cache").read(
            ud_root / "syn_svo" / "train.conllu", "raise", Parsing().read, "conllu"
        )
    finally:
        os.umask(previous)
    (entry,) = (tmp_path / "cache" / "parsed").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o775
    full = DataCache(tmp_path / "full")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("datasets.Dataset.save_to_disk", disk_full)
    with caplog.at_level(logging.WARNING, logger="subnets.data.cache"):
        file = full.read(ud_root / "syn_svo" / "train.conllu", "raise", Parsing().read, "conllu")
    assert (
        file.examples and "could not write the cache entry" in caplog.text and "No space left" in caplog.text
    )
    assert not any((tmp_path / "full" / "parsed").iterdir())  # no half entry left


# ---------------------------------------------------------------- 6. two runs in one folder
HOLD = textwrap.dedent("""
    import sys, time
    from subnets.runs.folder import RunFolder
    with RunFolder(sys.argv[1]).lock():
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_run_in_a_busy_folder_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
    tmp_path, caplog
):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for overrides in ([], ["overwrite=true"]):
            with pytest.raises(
                RunFolderInUse, match=rf"in use by another run \(pid {holder.pid} on .*started"
            ):
                run(tiny_config("fewshot.repetitions=0", *overrides), folder)
        assert not (folder / "run.json").exists()
        assert "RunFolderInUse" in (folder / "train.log").read_text()  # the refusal is logged
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed: its lock file stays behind, its lock does not
        holder.wait()
    assert (folder / ".lock").exists()
    with caplog.at_level(logging.WARNING, logger="subnets.runs.folder"):
        results = run(tiny_config("fewshot.repetitions=0"), folder)
    assert results["steps"] == 12 and "took over the lock of a process that is gone" in caplog.text
    assert not (folder / ".lock").exists()  # released at the end


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    folder = RunFolder(tmp_path)
    with folder.lock(), pytest.raises(RunFolderInUse), folder.lock():
        pass
    with folder.lock():  # released
        pass


# ---------------------------------------------------------------- 8. smaller ones
def test_a_refused_command_writes_its_error_into_train_log(tmp_path):
    done = cli("subnets.train", *TINY, "masks.keep_ratio=1.5", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert done.returncode != 0
    assert "masks.keep_ratio=1.5: expected in (0, 1]" in (tmp_path / "train.log").read_text()


def test_a_datasets_treebank_with_an_empty_token_or_a_short_column_is_refused(tmp_path):
    from datasets import Dataset

    rows = {"tokens": [["a", "b"], ["c", ""], ["d", "e"]], "upos": [["NOUN", "VERB"]] * 3,
            "head": [["2", "0"], ["2", "0"], ["0"]], "deprel": [["nsubj", "root"]] * 3}  # fmt: skip
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "train"))
    with pytest.raises(ConlluError, match=r"train:2 \(sentence 2\): row 2: token 2 is empty"):
        read_dataset_split(tmp_path / "train")
    skipped = read_dataset_split(tmp_path / "train", "skip")
    assert len(skipped.examples) == 1
    assert [e.problem for e in skipped.skipped] == [
        "row 2: token 2 is empty (''; the CoNLL-U reader refuses an empty FORM)",
        "row 3: column head has 1 values for 2 tokens",
    ]


def test_parse_refuses_a_string_where_words_are_expected(finished):
    trained = load_run(finished)
    with pytest.raises(TypeError, match="got the string 'abc'"):
        trained.parse("abc")
    with pytest.raises(TypeError, match=r"sentence 2: expected a list of words, got the string 'lue wino'"):
        trained.parse([["wino", "lue"], "lue wino"])
    assert len(trained.parse([["wino", "lue"]])[0].heads) == 2


def test_a_language_that_is_not_a_training_language_is_named_in_a_warning(tmp_path, caplog):
    folder = tmp_path / "run"
    run(tiny_config("+method=dynamic", "fewshot.repetitions=0"), folder)
    trained = load_run(folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="subnets.runs.trained"):
        trained.parse([["wino", "lue"]], language="syn_svo")
        assert not caplog.text
        trained.parse([["wino", "lue"]], language="syn_sov_typo")
    assert "language=syn_sov_typo is not a training language" in caplog.text
    assert "syn_svo, syn_sov, syn_vso, syn_osv" in caplog.text and "masks.target_policy=full" in caplog.text


def test_evaluate_prints_which_checkpoint_it_used_and_where_its_results_went(finished, tmp_path, capsys):
    output = tmp_path / "evaluation"
    results = evaluate_run(finished, output=output)
    best = finished / "checkpoints" / "best.safetensors"
    assert results["evaluated"]["checkpoint"] == str(best)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        last_line
        == f"evaluated {best} (step {results['evaluated']['step']}); results in {output / 'results.json'}"
    )
