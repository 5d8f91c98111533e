"""The Task protocol: what the runner, the methods and the few-shot protocol need from a task.

A task says how one language's examples are read from its files (validated, with file:line
errors), how a batch is collated, which head goes on the [Encoder][subnets.models.encoder.Encoder]
(its ``model(batch).loss`` is the loss every method uses: importance, Fisher, masked steps,
MAML), how predictions are written in the task's own file format, and which metrics it
reports, one of them primary (checkpoint selection, reports). Every hook takes explicit
arguments; none sees the run. A task of your own is a subclass named by ``task._target_``::

    task:
      _target_: my_module.MyTask
      my_setting: 3

Few-shot support sets are ``k`` examples drawn as for every task
([draw_support][subnets.data.support.draw_support]); a task with labels learns its label set from the
training data ([Task.fit][subnets.tasks.base.Task.fit]) and keeps it in its state (``run.json``), so a trained
run is reloaded without its training data, and a label that training never saw is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from subnets.config import SettingError
from subnets.data.examples import DataError, ExampleFile
from subnets.models.heads import TaskModel


class Task:
    """Base class of tasks (module docstring). Subclasses set the class attributes and
    implement the methods that raise NotImplementedError.

    Attributes:
        name: the task's name in results.json and reports.
        suffixes: file suffixes of a language's split files (``<code>/<split><suffix>``), in
            order of preference; a ``datasets`` ``save_to_disk`` folder is also read.
        metrics: the score keys reported, in table order; ``primary`` selects checkpoints.
        lower_is_better: whether a lower primary metric is better (perplexity).
        count: the key of the number scores are computed over (``words``, ``examples``, ``tokens``).
        prediction_suffix: the suffix of the predictions files it writes.
    """

    name: str = "task"
    suffixes: tuple[str, ...] = ()
    prediction_suffix: str = ".txt"
    metrics: tuple[str, ...] = ()
    primary: str = ""
    lower_is_better: bool = False
    count: str = "words"

    # ------------------------------------------------------------ data
    def read(self, path: Path, on_error: str = "raise") -> ExampleFile:
        """The validated examples of a split file or ``datasets`` split folder."""
        raise NotImplementedError

    def cache_key(self) -> str:
        """What [read][subnets.tasks.base.Task.read] depends on, for the data cache's keys (default: the
        task's name)."""
        return self.name

    def read_unlabelled(self, path: Path, format: str = "auto") -> list:
        """Examples to predict from a file without labels (``subnets.predict``)."""
        raise NotImplementedError

    def fit(self, train: Mapping[str, Sequence]) -> None:
        """Learn what the task takes from the training examples (a label set), once, before the
        model is built; ``state_dict`` keeps it."""

    def check(self, examples: Sequence, where: str) -> None:
        """Raise a [DataError][subnets.data.examples.DataError] for an example the trained task cannot
        score (e.g. a label training never saw); ``where`` names the data."""

    # ------------------------------------------------------------ model
    def use_model(self, transformer: nn.Module, tokenizer: Any, causal: bool) -> None:
        """Check that the task fits the model (else raise a ``SettingError``)
        and take what its head needs from the model and the tokenizer; called before
        [build_model][subnets.tasks.base.Task.build_model]. ``causal``: the model is a decoder (its
        layout)."""

    def collator(self, tokenizer: Any, max_length: int, causal: bool):
        """``(examples, pieces, lang) -> batch`` for one encoder (the batch has ``input_ids``,
        ``num_words``, ``lang``, ``examples`` and ``to(device)``)."""
        raise NotImplementedError

    def build_model(self, encoder: nn.Module) -> TaskModel:
        """The task head on ``encoder`` (its parameters are drawn from torch's global generator)."""
        raise NotImplementedError

    # ------------------------------------------------------------ evaluation
    def score(self, examples: Sequence, predictions: Sequence) -> dict[str, float]:
        """``{count: n, metric: value, ...}`` of ``predictions`` against the gold ``examples``."""
        raise NotImplementedError

    def write_predictions(self, path: str | os.PathLike, examples: Sequence, predictions: Sequence,
                          scored: bool = True) -> Path:  # fmt: skip
        """Write ``predictions`` of ``examples`` in the task's file format; ``scored``: the examples
        are gold examples being scored (an evaluation writes what an official scorer compares),
        else input to annotate. Returns the path."""
        raise NotImplementedError

    def primary_of(self, scores: Mapping[str, float]) -> float:
        """The primary metric of ``scores``."""
        return float(scores[self.primary])

    def better(self, value: float, than: float | None) -> bool:
        """Whether primary metric ``value`` is better than ``than`` (None: nothing yet)."""
        if than is None:
            return True
        return value < than if self.lower_is_better else value > than

    def describe(self) -> dict[str, Any]:
        """What results.json records of the task (its name and metrics)."""
        return {"name": self.name, "primary_metric": self.primary, "metrics": list(self.metrics),
                "lower_is_better": self.lower_is_better, "count": self.count}  # fmt: skip

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class LabelledTask(Task):
    """A task whose examples carry labels from an open set learned from the training data
    (``labels``: the label names, model output ``i`` is ``labels[i]``)."""

    def __init__(self):
        self.labels: list[str] = []

    def example_labels(self, example) -> list[str]:
        """The labels of one example (its words' tags, or its one class)."""
        raise NotImplementedError

    def fit(self, train: Mapping[str, Sequence]) -> None:
        found = {label for examples in train.values() for e in examples for label in self.example_labels(e)}
        self.labels = sorted(found)
        if len(self.labels) < 2:
            raise SettingError(f"task {self.name}: the training data holds {len(self.labels)} label(s) "
                               f"({', '.join(self.labels) or 'none'}); a classifier needs at least 2")  # fmt: skip

    @property
    def index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def check(self, examples: Sequence, where: str) -> None:
        known = set(self.labels)
        for example in examples:
            unseen = [label for label in self.example_labels(example) if label not in known]
            if unseen:
                path, _, line = example.source.rpartition(":")
                raise DataError(path or where, int(line) if line.isdigit() else 1, example.sent_id,
                                f"label {unseen[0]!r} never occurs in the training data (task {self.name} knows "
                                f"{', '.join(self.labels)}); a model cannot predict it")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.labels = list(state.get("labels", []))


def build_task(cfg: Any, state: Mapping[str, Any] | None = None) -> Task:
    """The task of ``cfg.task`` (built from its ``_target_``), with ``state`` (its label set, as a
    trained run recorded it) if given."""
    settings = (
        OmegaConf.to_container(cfg.task, resolve=True) if OmegaConf.is_config(cfg.task) else dict(cfg.task)
    )
    try:
        task = instantiate(settings)
    except Exception as error:  # Hydra wraps the constructor's TypeError (an unknown setting)
        cause = error.__cause__ or error
        if isinstance(cause, SettingError):
            raise cause from None
        raise SettingError(f"task={settings.get('_target_')}: {cause}") from None
    if not isinstance(task, Task):
        raise SettingError(f"task._target_={settings.get('_target_')} is not a subnets.tasks.Task "
                           f"(it made a {type(task).__name__})")  # fmt: skip
    if state is not None:
        task.load_state_dict(state)
    return task
