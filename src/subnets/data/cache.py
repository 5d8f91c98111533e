"""Read and tokenized data files cached on disk as ``datasets.Dataset`` folders, so that the
jobs of a sweep read and tokenize each file once.

A read file is keyed by the SHA-256 of its content, the reader (a task and its settings) and
``on_error``; the subword pieces of a set of examples by the tokenizer's fingerprint and the
examples' words. A key never names a
path, so a moved or copied file is found, and a changed one is read again; a cached entry holds
exactly what reading gives (the validated examples and the skipped examples' errors), so a
run gives the same results with the cache, without it, cold or warm (tested). Each entry is
written whole or not at all (a temporary folder renamed into place) and ends with
``done.json``, its row count and the checksum of its files: an entry damaged later (a cut
file) is found when it is read, and read and written again with a warning. The cache's
folders and files follow the umask, so a group can share one.

The cache folder is ``languages.cache_dir``, else ``$SUBNETS_CACHE_DIR``, else
``~/.cache/subnets``; ``languages.cache=false`` switches it off.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from subnets.data.examples import DataError, ExampleFile
from subnets.files import current_umask

log = logging.getLogger(__name__)

VERSION = "4"  # bump when what is cached changes (4: labels kept as written, blank tagging columns refused)
DONE = "done.json"  # written last into an entry: its row count and checksum


def cache_folder(configured: str | None) -> Path:
    """Where the cache lives (module docstring)."""
    return Path(configured or os.environ.get("SUBNETS_CACHE_DIR") or "~/.cache/subnets").expanduser()


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of every file of a folder (names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's whole definition (a fast tokenizer's JSON, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class DataCache:
    """The cache under ``folder`` (``None``: no caching, every call reads or tokenizes)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None
        self._tokenizer_keys: dict[int, str] = {}  # id(tokenizer) -> fingerprint, computed once

    def read(
        self, path: Path, on_error: str, reader: Callable[[Path, str], ExampleFile], kind: str
    ) -> ExampleFile:
        """``reader(path, on_error)``, or what it gave for a file of the same content before;
        ``kind`` names the reader (a task and its reading settings) in the cache key."""
        if self.folder is None:
            return reader(path, on_error)
        entry = self.folder / "parsed" / f"{sha256_path(path)[:32]}-{kind}-{on_error}-v{VERSION}"
        columns = self._load(entry)
        if columns is not None:
            about = json.loads((entry / "examples.json").read_text())
            return _example_file(columns, about, path)
        file = reader(path, on_error)
        self._save(entry, _example_columns(file.examples, path), {"examples.json": _about(file, path)})
        return file

    def pieces(self, sentences: Sequence, tokenizer, encode: Callable[[], list]) -> list:
        """``encode()`` (the sentences' word pieces), or what it gave for the same forms and tokenizer."""
        if self.folder is None or not sentences:
            return encode()
        if id(tokenizer) not in self._tokenizer_keys:
            self._tokenizer_keys[id(tokenizer)] = tokenizer_fingerprint(tokenizer)
        digest = hashlib.sha256(self._tokenizer_keys[id(tokenizer)].encode())
        for sentence in sentences:
            digest.update("\t".join(sentence.forms).encode() + b"\n")
        entry = self.folder / "pieces" / f"{digest.hexdigest()[:32]}-v{VERSION}"
        columns = self._load(entry)
        if columns is not None and len(columns["pieces"]) == len(sentences):
            return columns["pieces"]
        pieces = encode()
        self._save(entry, {"pieces": pieces}, {})
        return pieces

    def _load(self, entry: Path) -> dict | None:
        """The columns of a complete, intact entry; None where there is none. A damaged entry
        (a file cut or changed since it was written: its row count or checksum differs from its
        ``done.json``) is removed with a warning, to be written again."""
        if not entry.exists():
            return None
        from datasets import load_from_disk

        try:
            record = json.loads((entry / DONE).read_text())
            if _entry_checksum(entry) != record["sha256"]:
                raise ValueError("its files do not match the checksum written with them")
            with _no_progress_bars():
                columns = load_from_disk(str(entry / "dataset")).to_dict()
            rows = len(next(iter(columns.values()), []))
            if rows != record["rows"]:
                raise ValueError(f"it holds {rows} rows, {record['rows']} were written")
            return columns
        except Exception as error:  # a missing or cut file: json, pyarrow and datasets raise their own types
            log.warning("the cache entry %s is damaged (%s: %s); reading the data again and rewriting it",
                        entry, type(error).__name__, error)  # fmt: skip
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def _save(self, entry: Path, columns: dict, files: dict[str, str]) -> None:
        """Write the dataset and ``files`` into a temporary folder, then ``done.json`` (row count
        and checksum of everything else), and rename the folder into place: a crash or a
        concurrent job never leaves half an entry, and a file damaged later is detected
        (``_load``). A failure to write (disk full, permissions) is a warning: the run goes
        on without caching the entry."""
        from datasets import Dataset

        temporary = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
            os.chmod(
                temporary, 0o777 & ~current_umask()
            )  # mkdtemp makes it private; a shared cache follows the umask
            with _no_progress_bars():
                Dataset.from_dict(columns).save_to_disk(str(temporary / "dataset"))
            for name, text in files.items():
                (temporary / name).write_text(text)
            rows = len(next(iter(columns.values()), []))
            (temporary / DONE).write_text(json.dumps({"rows": rows, "sha256": _entry_checksum(temporary)}))
            os.rename(temporary, entry)
        except OSError as error:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            if not (
                error.errno in (errno.EEXIST, errno.ENOTEMPTY) and entry.exists()
            ):  # else another job wrote it first
                log.warning("could not write the cache entry %s (%s); going on without it", entry, error)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' own bars stay off while the cache writes (a bar per file would flood the log)."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


NOT_CACHED = ("tokens",)  # Sentence.tokens: the conllu TokenList, rebuilt by nothing that reads the cache


def _example_columns(examples: Sequence, path: Path) -> dict[str, list]:
    """An example dataclass per row, its fields as columns (a ``source`` without the file's path:
    the same content may be read from another path)."""
    prefix = f"{path}:"
    names = [f.name for f in fields(examples[0]) if f.name not in NOT_CACHED]
    columns = {name: [getattr(e, name) for e in examples] for name in names}
    if "source" in columns:
        columns["source"] = [s.removeprefix(prefix) if s.startswith(prefix) else s for s in columns["source"]]
    return columns


def _about(file: ExampleFile, path: Path) -> str:
    kind = type(file.examples[0])
    skipped = [{"line": e.line, "sent_id": e.sent_id, "problem": e.problem} for e in file.skipped]
    return json.dumps({"class": f"{kind.__module__}:{kind.__qualname__}", "skipped": skipped})


def _example_file(columns: dict, about: dict, path: Path) -> ExampleFile:
    module, _, name = about["class"].partition(":")
    kind = getattr(importlib.import_module(module), name)
    if "source" in columns:
        columns["source"] = [f"{path}:{s}" if s.isdigit() else s for s in columns["source"]]
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    skipped = [DataError(path, e["line"], e["sent_id"], e["problem"]) for e in about["skipped"]]
    return ExampleFile(path, [kind(**row) for row in rows], skipped)


def _entry_checksum(entry: Path) -> str:
    """SHA-256 of every file of a cache entry but ``done.json``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in entry.rglob("*") if p.is_file() and p.name != DONE):
        digest.update(str(file.relative_to(entry)).encode() + b"\0" + bytes.fromhex(sha256_path(file)))
    return digest.hexdigest()
