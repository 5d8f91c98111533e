"""A run folder: every path a run writes, and the lock that keeps one run in it at a time.

The lock is an exclusive ``flock`` on ``<folder>/.lock``, taken before a run (or an
evaluation, or ``overwrite=true``) reads or writes anything in the folder and held until it
ends; the file names its holder (process id, host, start time, command). A second command on
the same folder is refused with that record. The operating system releases a lock when its
process dies, so a lock left by a killed process is stale: the next command takes it over
(and says so). The file is removed when the lock is released. Taking the lock also deletes the
temporary files that writes killed mid-way left ([remove_stale_temporaries][subnets.files.remove_stale_temporaries]).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from subnets.files import atomic_write_json, atomic_write_text, read_jsonl, remove_stale_temporaries

log = logging.getLogger(__name__)


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock."""


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (docs/guides/reuse.md, "What a run writes")."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.safetensors"

    @property
    def best_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "best.safetensors"

    @property
    def identity(self) -> Path:
        return self.root / "run.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def conflict(self) -> Path:
        return self.root / "analysis" / "gradient_conflict.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def predictions(self, name: str) -> Path:
        """``predictions/<name>`` (e.g. ``syn_svo-dev.conllu``, ``fewshot``)."""
        return self.root / "predictions" / name

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock (module docstring) while the block runs.

        Raises:
            RunFolderInUse: another live process holds it; the message names the holder.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.lock_path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderInUse(
                    f"{self.root} is in use by another run ({holder}; lock file {path}): wait for it to finish, "
                    "or use another folder (hydra.run.dir=...)"
                ) from None
            try:  # the holder may have removed the file between our open and our lock: take the new one
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        stale = _read_holder(fd, default="")
        if stale:
            log.warning("%s: took over the lock of a process that is gone (%s)", self.root, stale)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        for path in remove_stale_temporaries(self.root):
            log.info("removed %s, the temporary file of a write that was killed", path)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # before the release, so that a waiting process opens a new file
            os.close(fd)

    def drop_records_after(self, step: int | None) -> None:
        """Drop the metrics and analysis records a killed run logged after ``step`` (all of them
        for ``None``: the run starts again): the resumed run logs them again."""
        for path in (self.metrics, self.conflict):
            if path.exists():
                kept = [r for r in read_jsonl(path) if step is not None and r.get("step", 0) <= step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def record(self, identity: dict, files: dict[str, str] | None = None) -> None:
        """Write ``run.json`` (once a run's set-up has checked everything it can check) and
        ``files`` (relative path -> text, e.g. Hydra's ``.hydra/*.yaml``), each unless it exists."""
        if not self.identity.exists():
            atomic_write_json(self.identity, identity)
        for name, text in (files or {}).items():
            if not (self.root / name).exists():
                atomic_write_text(self.root / name, text)

    def clear(self) -> None:
        """Delete what a run wrote into the folder, its ``.hydra/`` record included (log files
        stay: Hydra's logger holds them open; the lock stays: it is held)."""
        for path in self.root.glob("*"):  # pathlib's * matches names that start with a dot
            if path.suffix == ".log" or path == self.lock_path:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _read_holder(fd: int, default: str = "holder unknown") -> str:
    data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not data:
        return default
    try:
        record = json.loads(data)
        return f"pid {record['pid']} on {record['host']}, started {record['started']}: {record['command']}"
    except (ValueError, KeyError, TypeError):
        return data
