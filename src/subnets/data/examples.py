"""What the data of every task shares: the examples read from one file, the errors of the ones
left out, and reading a file as UTF-8 with errors that name the line.

An example is a dataclass with at least ``sent_id`` (its id), ``forms`` (the words the
tokenizer splits into subword pieces) and ``source`` (``<file>:<line>``, for messages); its
length is its number of words. [Sentence][subnets.data.treebank.Sentence] (CoNLL-U) is one; each
task in ``subnets.tasks`` defines its own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A problem in a data file, located by file, line (1-based; a row of a ``datasets`` folder)
    and example id."""

    def __init__(self, path: str | os.PathLike, line: int, sent_id: str | None, problem: str):
        self.path, self.line, self.sent_id, self.problem = str(path), line, sent_id, problem
        where = f"{self.path}:{line}" + (f" (sentence {sent_id})" if sent_id else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class ExampleFile:
    """The valid examples of a file, and the errors of the examples skipped (``on_error="skip"``)."""

    path: Path
    examples: list
    skipped: list[DataError]

    @property
    def num_words(self) -> int:
        return sum(len(e) for e in self.examples)


ON_ERROR = ("raise", "skip")


def read_utf8(path: str | os.PathLike, kind: str, error: type[DataError] = DataError) -> str:
    """The text of a UTF-8 file without its byte-order mark; undecodable bytes raise ``error``
    (a [DataError][subnets.data.examples.DataError]) naming their line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as problem:
        line = data[: problem.start].count(b"\n") + 1
        bad = data[problem.start : problem.end]
        raise error(path, line, None, f"bytes {bad!r} are not UTF-8 ({kind} files are UTF-8)") from None


def collect(path: str | os.PathLike, items, parse, on_error: str, kind: str) -> ExampleFile:
    """Parse every ``(line, id, raw)`` of ``items`` with ``parse(line, id, raw)`` into an example
    (raising [DataError][subnets.data.examples.DataError] for a bad one): the first error is raised
    (``on_error="raise"``) or kept with the example left out (``"skip"``). A file with no valid example is an
    error."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    examples, skipped = [], []
    for line, sent_id, raw in items:
        try:
            examples.append(parse(line, sent_id, raw))
        except DataError as error:
            if on_error == "raise":
                raise
            skipped.append(error)
    if not examples:
        problem = f"no valid {kind}" if skipped else f"the file holds no {kind}"
        raise DataError(
            path, 1, None, problem + (f" (first problem: {skipped[0].problem})" if skipped else "")
        )
    return ExampleFile(Path(path), examples, skipped)


IOB2 = re.compile(r"(?:O|[BI]-\S+)\Z")
_CONLLU_ID = re.compile(r"[0-9]+(?:[-.][0-9]+)?\Z")
FORMATS = {
    "conllu": "CoNLL-U",
    "conll": "CoNLL NER (a token and its IOB2 tag per line)",
    "jsonl": "JSON lines",
    "tsv": "TSV (a header naming text)",
    "text": "plain text",
}


def sniff_format(path: str | os.PathLike, lines: int = 5) -> tuple[str, int]:
    """The format of a file (a key of ``FORMATS``) and the line it was decided on, from its
    first ``lines`` lines that are neither blank nor comments (``#``, ``-DOCSTART-``): ``conllu``
    (ten tab-separated columns, the first a word ID), ``jsonl`` (a JSON object), ``tsv`` (a
    tab-separated header naming ``text``), ``conll`` (every such line a token and an IOB2 tag
    last, tab- or else space-separated), else ``text``. An empty file is an error."""
    seen, first = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.lstrip("\ufeff").rstrip("\r\n")
            if line.strip():
                first = first or number
                if not line.startswith(("#", "-DOCSTART-")):
                    seen.append((number, line))
                    if len(seen) == lines:
                        break
    if not first:
        raise DataError(path, 1, None, "the file is empty")
    if not seen:
        return "text", first
    number, line = seen[0]
    cells = line.split("\t")
    if len(cells) == 10 and _CONLLU_ID.match(cells[0]):
        return "conllu", number
    if line.startswith("{"):
        try:
            if isinstance(json.loads(line), dict):
                return "jsonl", number
        except json.JSONDecodeError:
            pass
    if "text" in (cell.strip() for cell in cells) and len(cells) > 1:
        return "tsv", number
    tagged = [line.split("\t") if "\t" in line else line.split() for _, line in seen]
    if all(len(c) > 1 and IOB2.match(c[-1].strip()) for c in tagged):
        return "conll", number
    return "text", number


def check_format(path: str | os.PathLike, task: str, accepted: tuple[str, ...], reads: str) -> str:
    """The format of ``path`` (``sniff_format``) when it is one of ``accepted``; else a
    ``DataError`` at the line it was decided on, saying what it looks like and what the
    ``task`` ``reads``."""
    found, number = sniff_format(path)
    if found not in accepted:
        raise DataError(path, number, None, f"looks like {FORMATS[found]}; the {task} task reads {reads}")
    return found
