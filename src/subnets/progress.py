"""Watching a run: progress bars on a terminal, log lines everywhere, seconds per phase.

On a terminal each phase (training, evaluation, the mask search, the few-shot protocol) shows a
tqdm bar on stderr; off a terminal (SLURM, nohup, CI) the bars stay silent and the log lines
tell the same story: the ``subnets`` loggers write to stderr and to ``<run>/train.log``
(configured by Hydra for ``python -m subnets.train``, and by ``run_log`` for
[subnets.run][] called from Python).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def bar(total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True) -> tqdm:
    """A progress bar on stderr, drawn only when stderr is a terminal (and ``enabled``)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                disable=None if enabled else True, file=sys.stderr)  # fmt: skip


def duration(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Clock:
    """Wall-clock seconds spent in each named phase (``with clock("few_shot"): ...``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {phase: round(seconds, 2) for phase, seconds in self.seconds.items()}


class _FolderLogHandler(logging.FileHandler):
    """A file handler that writes nothing while its folder does not exist (a run refused before
    it made its folder leaves no folder behind)."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not Path(self.baseFilename).parent.is_dir():
            return
        super().emit(record)


@contextmanager
def run_log(folder: str | os.PathLike) -> Iterator[None]:
    """While a run lasts: its ``subnets`` log records at INFO go to ``<folder>/train.log``
    once the folder exists (unless a handler writes there already, as Hydra's does), and log
    lines written to a terminal do not break its progress bars."""
    path = (Path(folder) / "train.log").resolve()
    package = logging.getLogger("subnets")
    handlers = [*logging.getLogger().handlers, *package.handlers]
    logged = any(Path(getattr(h, "baseFilename", "")).resolve() == path for h in handlers)
    handler, level = None, package.level
    if not logged:
        handler = _FolderLogHandler(path, delay=True)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        package.setLevel(level)
        if handler is not None:
            package.removeHandler(handler)
            handler.close()
