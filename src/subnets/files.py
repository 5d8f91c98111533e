"""Crash-safe file writing (a reader never sees a half-written file), and safetensors files whose
bytes depend only on their tensors and header."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's: .<name>.<8 random characters>.tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The rename is atomic on POSIX file systems, so ``path`` holds either its old content or the
    complete new one, never a partial file. The file's mode follows the umask, as a file made
    by ``open`` would (the temporary file itself is private: 0600). A symbolic link is kept and
    its target written; a node that is not a regular file (a device, a FIFO) is written
    through (``write(path)``), never replaced. A failed write (a full disk) raises an OSError
    naming the file and saying that its previous content is intact.
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/stdout: a link to a pipe
        _failing_names(path, lambda: write(str(path)), "")
        return path
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    kept = f"; the previous {target} is intact" if target.exists() else f"; nothing was written to {target}"
    try:
        _failing_names(target, lambda: write(tmp), kept)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _failing_names(path: Path, write: Callable[[], None], kept: str) -> None:
    """``write()``, where an OSError (or safetensors' error, which names no file) becomes an
    OSError naming ``path``, with ``kept``."""
    from safetensors import SafetensorError

    try:
        write()
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        number = getattr(error, "errno", None)
        message = f"could not write {path}: {reason}{kept}"
        raise (OSError(number, message) if number else OSError(message)) from error


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` calls killed mid-way left in ``folder``
    and its subfolders (only files named as it names them; a subfolder holding a ``.lock``, which
    another command may be writing, is left alone). Call it holding ``folder``'s lock."""
    removed = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not os.path.exists(os.path.join(root, name, ".lock"))]
        for name in files:
            path = Path(root, name)
            if TEMPORARY_NAME.fullmatch(name) and path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_path(output: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (),
                      setting: str = "output") -> Path:  # fmt: skip
    """Refuse, before any work, an output file that would destroy an input or could not be
    written: one that is an input (the same path, or the same file under another name), a
    folder, a file that is not writable, or a path whose nearest existing parent is a file or a
    folder that is not writable. The errors name ``setting``; returns the output path."""
    path = Path(output)
    for given in inputs:
        source = Path(given)
        if source.exists() and (
            path.resolve() == source.resolve() or (path.exists() and os.path.samefile(path, source))
        ):
            raise ValueError(f"{setting}={path} is the input file {source}: writing it would destroy the input; "
                             "choose another output path")  # fmt: skip
    if path.is_dir():
        raise ValueError(f"{setting}={path} is a folder; expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{setting}={path} is not writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{setting}={path}: {parent} is a file, so the output cannot be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{setting}={path}: the folder {parent} is not writable")
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON value in ``path``; a file that is not valid JSON (truncated, edited) raises a
    ValueError naming the file, ``what`` it is, and the line and column of the problem."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} ({what}) is not valid JSON at line {error.lineno} column {error.colno}: "
            f"{error.msg} (the file is damaged or was edited)"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} ({what}) is not UTF-8 text: {error}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a missing file reads as an empty list. A last line without its
    newline (a process killed while appending it) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # after the final newline: "" or an unfinished line
    return [json.loads(line) for line in complete if line.strip()]


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line and flush it to disk (the folder is created if needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_safetensors(path: str | os.PathLike, tensors: dict, header: dict[str, Any]) -> Path:
    """Write ``tensors`` (name -> torch tensor) and the JSON-serialisable ``header`` to a
    safetensors file, atomically. The header goes into one metadata entry, so that identical
    tensors and header give identical bytes (safetensors writes several metadata entries in a
    varying order)."""
    from safetensors.torch import save_file

    metadata = {"subnets": json.dumps(header)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(
    path: str | os.PathLike, device: str = "cpu", what: str = "subnets file"
) -> tuple[dict, dict]:
    """The tensors and the header of a file written by ``save_safetensors`` (or by the
    earlier format, whose header entries were separate metadata strings).

    Raises:
        ValueError: ``path`` is not a safetensors file (the message names it as ``what``).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a {what} (not safetensors: {error})") from error
    if "subnets" in metadata:
        return tensors, json.loads(metadata["subnets"])
    return tensors, dict(metadata)
