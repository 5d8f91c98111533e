"""A trained run, reused: loaded in Python ([load_run][subnets.runs.trained.load_run]), evaluated on other
languages or settings ([evaluate_run][subnets.runs.trained.evaluate_run], ``python -m subnets.evaluate``), and used
to annotate new data in its task's format ([TrainedRun.predict_file][subnets.runs.trained.TrainedRun.predict_file],
``python -m subnets.predict``; a parser's [TrainedRun.parse][subnets.runs.trained.TrainedRun.parse]).

Nothing here writes into the training run's folder: an evaluation writes into a folder of its
own (default ``<run>/evaluations/<overrides>``).

Example (a notebook)::

    from subnets import load_run

    trained = load_run("outputs/default/+method=dynamic")
    for sentence in trained.parse([["the", "dog", "barks"], ["a", "cat", "sleeps"]], language="syn_svo"):
        print(sentence.heads, sentence.deprels)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from subnets.config import run_folder_name, setting
from subnets.data.dataset import Batcher, LanguageData
from subnets.data.languages import data_cache, data_root, load_run_data
from subnets.data.treebank import Sentence, unparsed
from subnets.evaluate import Evaluator, predict
from subnets.evaluate.fewshot import few_shot
from subnets.evaluate.results import Evaluation, write_results
from subnets.files import check_output_path, read_json
from subnets.methods.base import Method
from subnets.progress import Clock, run_log
from subnets.runs.checkpoint import checkpoint_config, load_checkpoint, load_model_state
from subnets.runs.checkpoint_schema import Key
from subnets.runs.folder import RunFolder
from subnets.runs.identity import config_differences
from subnets.runs.results import format_results
from subnets.runs.trained_folder import apply_overrides, checkpoint_file, read_run_config
from subnets.tasks import Parsing, Task
from subnets.training.assemble import assemble, check_settings, resolve_device

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """A trained run loaded for use ([load_run][subnets.runs.trained.load_run]).

    Attributes: ``folder`` (the run), ``cfg`` (its config, with any overrides), ``task`` (its
    [Task][subnets.tasks.Task], with the label set it trained with), ``model`` (in eval mode),
    ``tokenizer``, ``method`` (its policy holds the masks, importance averages or learned
    gates), ``batcher`` (its ``collator`` turns examples into model input), ``checkpoint`` (the
    file loaded), ``step`` (the training step it holds), ``best`` (the development score and
    step of the best model, if the run selected one).
    """

    folder: Path
    cfg: DictConfig
    task: Task
    model: nn.Module
    tokenizer: Any
    method: Method
    batcher: Batcher
    checkpoint: Path
    step: int
    best: dict[str, Any] | None

    @property
    def collator(self):
        return self.batcher.collator

    @property
    def languages(self) -> list[str]:
        """The training languages (each has its own subnetwork under a subnetwork method)."""
        return list(self.cfg.languages.train)

    @property
    def evaluator(self) -> Evaluator:
        return Evaluator(self.task, self.collator, self.cfg.train.eval_batch_size)

    def gates(self, language: str | None = None, support: LanguageData | str | os.PathLike | None = None):
        """Unit gates for ``language``: a training language's subnetwork; for any other
        language (or ``None``) the test-time policy's (``masks.target_policy``), which for
        ``support`` and ``nearest`` needs the language's annotated ``support`` examples."""
        policy = self.method.policy
        if language in self.languages:
            return policy.eval_gates(language)
        if language is not None and getattr(policy, "masks", None) is not None:
            log.warning("language=%s is not a training language of run=%s (%s): its subnetwork comes from the "
                        "test-time policy (masks.target_policy=%s)", language, self.folder, ", ".join(self.languages),
                        setting(self.cfg.masks.target_policy))  # fmt: skip
        if not policy.needs_support:
            return policy.eval_gates(language) if language else None
        if support is None:
            raise ValueError(
                f"masks.target_policy={setting(self.cfg.masks.target_policy)} chooses the subnetwork of an unseen language "
                f"({language or 'language not given'}) from annotated support examples: pass support=<a file of "
                f"that language in the task's format>, or a training language ({', '.join(self.languages)})"
            )
        code = language or "unseen"
        policy.prepare_evaluation(self.model, {code: self.data(support, code, "support")})
        return policy.eval_gates(code)

    def data(self, source: LanguageData | str | os.PathLike, code: str, split: str) -> LanguageData:
        """``source`` (a file or ``datasets`` folder in the task's format, read and checked by the
        task, or data already read) as tokenized [LanguageData][subnets.data.dataset.LanguageData]."""
        if isinstance(source, LanguageData):
            data = source
        else:
            file = self.task.read(Path(source), setting(self.cfg.languages.on_error))
            self.task.check(file.examples, str(source))
            data = LanguageData(code, split, file.examples, None, file.path, len(file.skipped))
        return data if data.pieces is not None else data.tokenize(self.tokenizer)

    def predict(self, examples: Sequence, language: str | None = None,
                support: LanguageData | str | os.PathLike | None = None) -> list:  # fmt: skip
        """The model's predictions for ``examples`` (the task's examples, e.g. from
        [read_unlabelled][subnets.tasks.base.Task.read_unlabelled]) with ``language``'s subnetwork
        ([gates][subnets.runs.trained.TrainedRun.gates])."""
        data = LanguageData(language or "unseen", "input", list(examples)).tokenize(self.tokenizer)
        return predict(
            self.model, data, self.collator, self.cfg.train.eval_batch_size, self.gates(language, support)
        )

    def parse(
        self,
        sentences: Sequence[Sentence | Sequence[str]],
        language: str | None = None,
        support: LanguageData | str | os.PathLike | None = None,
    ) -> list[Sentence]:
        """Parse ``sentences`` (token lists, or [Sentence][subnets.data.Sentence] objects, e.g. from
        [read_conllu][subnets.data.read_conllu] with ``trees=False``) with ``language``'s subnetwork
        ([gates][subnets.runs.trained.TrainedRun.gates]); returns the sentences with predicted heads and relations
        (and UPOS with a tagger), their CoNLL-U ``lines`` rewritten to match. For a parsing run."""
        if not isinstance(self.task, Parsing):
            raise TypeError(
                f"parse() is for parsing runs; this run's task is {self.task.name}: use predict()"
            )
        if isinstance(sentences, str):
            raise TypeError(f"sentences: expected a list of sentences, each a list of words, got the string "
                            f"{sentences[:40]!r} (e.g. [{sentences[:40]!r}.split()])")  # fmt: skip
        sentences = [s if isinstance(s, Sentence) else _sentence_of(s, i) for i, s in enumerate(sentences, 1)]
        heads, deprels, upos = self.task._columns(self.predict(sentences, language, support))
        return [s.annotated(*(None if values is None else values[i] for values in (heads, deprels, upos)))
                for i, s in enumerate(sentences)]  # fmt: skip

    def predict_file(
        self,
        input: str | os.PathLike,
        output: str | os.PathLike,
        language: str | None = None,
        support: LanguageData | str | os.PathLike | None = None,
        format: str = "auto",
    ) -> Path:
        """Annotate the file ``input`` into ``output`` in the task's format
        ([read_unlabelled][subnets.tasks.base.Task.read_unlabelled] and ``write_predictions``). For parsing
        and tagging, ``format``: ``conllu`` (any columns present are kept, comments, multiword tokens
        and empty nodes included; the predicted columns are filled in), ``text`` (one
        pre-tokenized sentence per line) or ``auto`` (CoNLL-U when the first non-empty line is a
        comment or has ten tab-separated columns); NER reads ``conll`` or ``text``,
        classification JSON lines or TSV, language modelling text. With ``auto``, a file of
        another task's format ([sniff_format][subnets.data.examples.sniff_format]) is refused, naming
        its line and what the task reads; ``format=text`` reads it as plain text all the same."""
        input = Path(input)
        if not input.is_file():
            raise FileNotFoundError(f"input={input}: no such file")
        check_output_path(output, [input, *([support] if isinstance(support, (str, os.PathLike)) else [])])
        examples = self.task.read_unlabelled(input, format)
        return self.task.write_predictions(
            output, examples, self.predict(examples, language, support), scored=False
        )

    parse_file = predict_file  # the name of earlier versions

    def evaluate(
        self,
        source: LanguageData | str | os.PathLike,
        language: str | None = None,
        support: LanguageData | str | os.PathLike | None = None,
        predictions: str | os.PathLike | None = None,
    ) -> dict[str, float]:
        """The task's scores on annotated ``source`` (a file in the task's format) with
        ``language``'s subnetwork ([gates][subnets.runs.trained.TrainedRun.gates]); with ``predictions``, writes
        the predictions there."""
        data = self.data(source, language or "unseen", "eval")
        return self.evaluator.score(self.model, data, self.gates(language, support), predictions)

    def few_shot(
        self,
        test: LanguageData | str | os.PathLike,
        language: str = "unseen",
        support_pool: LanguageData | str | os.PathLike | None = None,
        predictions: str | os.PathLike | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """The few-shot protocol ([subnets.evaluate.fewshot.few_shot][]) on one language from a copy of
        the model: support examples drawn from ``support_pool`` (default: from ``test``, and then
        left out of it), the run's ``fewshot.*`` settings unless ``settings`` (``k``,
        ``repetitions``, ``steps``, ``lr_encoder``, ...) say otherwise."""
        fewshot = OmegaConf.merge(self.cfg.fewshot, settings)
        test_data = self.data(test, language, "test")
        pool = test_data if support_pool is None else self.data(support_pool, language, "train")
        return few_shot(self.model, self.method.policy, {language: test_data}, {language: pool}, self.batcher,
                        self.tokenizer, fewshot, self.evaluator, seed=self.cfg.seed, clip_norm=self.cfg.train.clip_norm,
                        predictions=predictions)  # fmt: skip


def _sentence_of(forms: Sequence[str], number: int) -> Sentence:
    if isinstance(forms, str):
        raise TypeError(f"sentence {number}: expected a list of words, got the string {forms[:40]!r} "
                        f"(split it into words first, e.g. {forms[:40]!r}.split())")  # fmt: skip
    forms = list(forms)
    if not forms or not all(isinstance(f, str) and f and not f.isspace() for f in forms):
        raise ValueError(f"sentence {number}: expected a non-empty list of non-empty tokens, got {forms!r}")
    return unparsed(str(number), forms)


def load_run(
    folder: str | os.PathLike,
    checkpoint: str = "best",
    *,
    overrides: Sequence[str] = (),
    device: str | None = None,
) -> TrainedRun:
    """Load a trained run: its config (``run.json``, with ``overrides`` of the
    ``EVALUATION_SETTINGS``), task (with its label set), model and method state from
    ``checkpoint`` (``best``: the model the run's final evaluation used; ``last``: the last
    checkpoint, also of an unfinished run), and tokenizer, built as training built them
    ([assemble][subnets.training.assemble.assemble]). ``device`` overrides ``train.device``.

    Raises:
        FileNotFoundError, ValueError: a folder that holds no run, an unfinished run (for
            ``best``), a missing checkpoint or tokenizer, a model at ``model.name_or_path`` that
            is not the one the run trained, a checkpoint that does not fit (an edited run.json).
    """
    folder = Path(folder)
    cfg = apply_overrides(read_run_config(folder), overrides)
    if device is not None:
        cfg.train.device = device
    checked = check_settings(cfg)
    path = checkpoint_file(folder, checkpoint)
    identity = read_json(folder / "run.json", "the run's identity")
    tokenizer_folder = folder / "tokenizer"
    if cfg.model.name_or_path == "tiny" and not (tokenizer_folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"run={folder}: the tiny model's tokenizer {tokenizer_folder} is missing")

    def same_model(data, fingerprint) -> None:
        saved = identity.get("model", {}) if cfg.model.name_or_path != "tiny" else {}
        changed = [
            key for key in ("class", "config", "tokenizer") if key in saved and saved[key] != fingerprint[key]
        ]
        if changed:
            raise ValueError(f"model.name_or_path={cfg.model.name_or_path}: its {' and '.join(changed)} "
                             f"{'differ' if len(changed) > 1 else 'differs'} from what run={folder} was trained with; "
                             "point model.name_or_path at that model")  # fmt: skip

    parts = assemble(cfg, folder, device=resolve_device(cfg.train.device), task_state=identity.get("task", {}),
                     read_data=False, accept=same_model, checked=checked)  # fmt: skip
    model, method = parts.model, parts.method
    method.policy.bind(model, parts.batcher, list(cfg.languages.train))
    method.strategy.bind(model)
    state = load_checkpoint(path, parts.batcher.device)
    if Key.MODEL not in state and Key.SHARDED in state:
        raise ValueError(f"{path} holds its model in shards ({state[Key.SHARDED]}, train.parallel=fsdp): write the "
                         f"whole model into it first with `python -m subnets.consolidate run={folder}`")  # fmt: skip
    load_model_state(model, state[Key.MODEL], path, _described_by(folder, cfg, path))
    method.load_state_dict(state[Key.METHOD])
    model.eval()
    # best.safetensors: its own metric and step (in run.best's form); last.safetensors: the run's best
    best = state.get(Key.BEST)
    if Key.METRIC in state:
        best = {"metric": state[Key.METRIC], "step": state[Key.STEP]}
    return TrainedRun(
        folder, cfg, parts.task, model, parts.tokenizer, method, parts.batcher, path, state[Key.STEP], best
    )


def _described_by(folder: Path, cfg: DictConfig, checkpoint: Path) -> str:
    """run.json, and the settings in it that differ from those the run's checkpoints recorded
    (an edited run.json makes a model its checkpoints do not fit)."""
    described = str(folder / "run.json")
    recorded = next((c for c in (checkpoint_config(p) for p in (checkpoint, RunFolder(folder).last_checkpoint)
                                 if p.exists()) if c), None)  # fmt: skip
    if recorded is None:
        return described
    current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    changed = config_differences(recorded, current)
    return described + (f" (its settings differ from those the checkpoints recorded: {'; '.join(changed)})"
                        if changed else "")  # fmt: skip


def evaluation_folder(folder: str | os.PathLike, overrides: Sequence[str], checkpoint: str = "best") -> Path:
    """``<run>/evaluations/<overrides>`` (``default`` without any)."""
    parts = sorted(overrides) + ([f"checkpoint={checkpoint}"] if checkpoint != "best" else [])
    return Path(folder) / "evaluations" / (run_folder_name(",".join(parts)) if parts else "default")


def evaluate_run(
    folder: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    checkpoint: str = "best",
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a trained run as its final evaluation does (every source, development and
    target language, zero-shot and few-shot, with the method's test-time policy) on the
    languages and settings that ``overrides`` name ([load_run][subnets.runs.trained.load_run]), writing
    results.json and predictions into ``output`` (default ``evaluation_folder``). On the run's own languages
    and settings it reproduces the run's scores and predictions. An earlier evaluation in
    ``output`` is replaced whole (its predictions too) when it evaluated the same run, checkpoint
    and overrides, or with ``overwrite``; one of anything else is refused, as is a folder holding
    files that no evaluation writes."""
    output = Path(output) if output is not None else evaluation_folder(folder, overrides, checkpoint)
    _check_evaluation_output(output, folder, overrides, checkpoint, overwrite)
    trained = load_run(folder, checkpoint, overrides=overrides)
    output.mkdir(parents=True, exist_ok=True)
    with run_log(output), RunFolder(output).lock():
        RunFolder(output).clear()  # an earlier evaluation, whole (its log stays)
        log.info("evaluating %s (step %d) of run=%s", trained.checkpoint, trained.step, trained.folder)
        evaluation = _evaluation(trained, output)
        about = {"evaluated": {"run": str(trained.folder), "checkpoint": str(trained.checkpoint),
                               "step": trained.step, "overrides": list(overrides)}}  # fmt: skip
        results = write_results(evaluation, about)
    print(format_results(results))
    print(f"evaluated {trained.checkpoint} (step {trained.step}); results in {output / 'results.json'}")
    return results


EVALUATION_FILES = {"results.json", "predictions", "data", "train.log", ".lock"}  # what an evaluation writes


def _check_evaluation_output(output: Path, folder: str | os.PathLike, overrides: Sequence[str], checkpoint: str,
                             overwrite: bool) -> None:  # fmt: skip
    """Refuse an evaluation ``output`` that holds a training run, files no evaluation writes, or
    (without ``overwrite``) the evaluation of another run, checkpoint or overrides."""
    if (output / "run.json").exists():
        raise FileExistsError(f"output={output} holds a training run; choose another folder")
    foreign = sorted(set(os.listdir(output)) - EVALUATION_FILES) if output.is_dir() else []
    if foreign:
        raise FileExistsError(f"output={output} holds files that no evaluation writes ({', '.join(foreign[:4])}): "
                              "choose a new or empty folder")  # fmt: skip
    if overwrite or not (output / "results.json").exists():
        return
    earlier = read_json(output / "results.json", "an evaluation's results").get("evaluated") or {}
    same = (
        Path(earlier.get("run", "")).resolve() == Path(folder).resolve()
        and Path(earlier.get("checkpoint", "")).name == checkpoint_file(folder, checkpoint).name
        and sorted(earlier.get("overrides", [])) == sorted(overrides)
    )  # fmt: skip
    if not same:
        described = (f"the evaluation of run={earlier['run']} (checkpoint {earlier.get('checkpoint')}, overrides "
                     f"{earlier.get('overrides')})" if earlier else "results.json that no evaluation wrote")  # fmt: skip
        raise FileExistsError(f"output={output} holds {described}: pass overwrite=true to replace it, or choose "
                              "another folder")  # fmt: skip


def _evaluation(trained: TrainedRun, output: Path) -> Evaluation:
    """What ``python -m subnets.evaluate`` scores: ``trained`` on the languages of its config, written
    into ``output`` (only ``output`` is written: results, predictions and its synthetic data)."""
    cfg, clock, started = trained.cfg, Clock(), time.perf_counter()
    with clock("setup"):
        cache = data_cache(cfg.languages)
        data = load_run_data(cfg.languages, cfg.fewshot, data_root(cfg.languages, output), trained.task, seed=cfg.seed,
                             needs_support=trained.method.policy.needs_support, read_train=False, cache=cache)  # fmt: skip
        for language in data.all():
            trained.task.check(language.examples, f"{language.code} {language.split} ({language.path})")
        data.tokenize(trained.tokenizer, cache)
    with clock("final_evaluation"):
        trained.method.policy.prepare_evaluation(trained.model, data.support)
    return Evaluation(cfg, trained.model, trained.method, trained.task, data, trained.batcher, trained.tokenizer,
                      RunFolder(output), trained.step, trained.best, clock=clock, started=started)  # fmt: skip
