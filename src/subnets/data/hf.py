"""Treebanks stored as Hugging Face ``datasets``, beside CoNLL-U files.

A folder ``<root>/<code>/`` written by ``DatasetDict.save_to_disk`` (it holds
``dataset_dict.json``) is a treebank whose splits are the dataset's ``train``, ``validation``
(or ``dev``) and ``test``. Its columns are those of the Hub's ``universal_dependencies``
dataset: ``tokens``, ``upos`` (names or class ids), ``head`` and ``deprel``, and optionally
``idx`` (the sentence id), ``text``, ``lemmas``, ``xpos``, ``feats``, ``deps``, ``misc``. So a
Hub treebank is used offline after::

    from datasets import load_dataset
    load_dataset("universal_dependencies", "en_ewt").save_to_disk("my_ud/en_ewt")

With ``datasets`` 4 and later (which no longer run loading scripts such as the Hub's
``universal_dependencies``), build such a folder from files:
[conllu_dataset][subnets.data.hf.conllu_dataset] turns a CoNLL-U file into a ``Dataset`` of this layout (also
the input of a ``Trainer``), and parquet files of this layout load with
``load_dataset("parquet", data_files={...})``.

Each split is turned into CoNLL-U text and read by [parse_conllu][subnets.data.treebank.parse_conllu],
so it is validated exactly as a CoNLL-U file is; error messages name the split folder, the
sentence id and the line of the converted text.
"""

from __future__ import annotations

import json
from pathlib import Path

from subnets.data.examples import ExampleFile
from subnets.data.treebank import ConlluError, parse_conllu

SPLIT_NAMES = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}
_COLUMNS = ("tokens", "lemmas", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")


def dataset_splits(folder: Path) -> dict[str, Path]:
    """The split folders of a ``save_to_disk`` dataset folder, by subnets' split names (train,
    dev, test); empty when ``folder`` holds no dataset."""
    index = folder / "dataset_dict.json"
    if not index.exists():
        return {}
    names = json.loads(index.read_text()).get("splits", [])
    return {SPLIT_NAMES[name]: folder / name for name in names if name in SPLIT_NAMES}


def read_dataset_split(path: Path, on_error: str = "raise") -> ExampleFile:
    """Read and validate one split folder of a ``datasets`` treebank (module docstring)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    missing = [c for c in ("tokens", "upos", "head", "deprel") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: a datasets treebank needs the columns tokens, upos, head and deprel "
                         f"(the universal_dependencies layout); missing: {', '.join(missing)}")  # fmt: skip
    upos_feature = getattr(dataset.features["upos"], "feature", None)
    upos_names = getattr(upos_feature, "names", None)
    blocks, problems = [], []
    for number, row in enumerate(dataset, start=1):
        sent_id = str(row.get("idx") or number)
        problem = _row_problem(row)
        if problem:
            error = ConlluError(path, number, sent_id, f"row {number}: {problem}")
            if on_error == "raise":
                raise error
            problems.append(error)
            continue
        lines = [f"# sent_id = {sent_id}"]
        if row.get("text"):
            lines.append(f"# text = {row['text']}")
        for i in range(len(row["tokens"])):
            values = []
            for column in _COLUMNS:
                value = row.get(column)
                value = value[i] if value is not None else None
                if column == "upos" and isinstance(value, int) and upos_names:
                    value = upos_names[value]
                values.append("_" if value is None or value == "" else str(value))
            lines.append("\t".join([str(i + 1), *values]))
        blocks.append("\n".join(lines))
    if not blocks:
        raise ConlluError(path, 1, None, f"no valid sentence ({len(problems)} rows skipped; first: {problems[0].problem})"
                          if problems else "the dataset holds no row")  # fmt: skip
    file = parse_conllu("\n\n".join(blocks) + "\n", path, on_error)
    file.skipped = problems + file.skipped
    return file


def _row_problem(row: dict) -> str | None:
    """What is wrong with a row that converting it to CoNLL-U would hide (an empty token would
    become ``_``, a short column ``_`` for the tokens it lacks), or None."""
    tokens = row["tokens"]
    if not tokens:
        return "no tokens"
    for i, token in enumerate(tokens, start=1):
        if not isinstance(token, str) or not token.strip():
            return f"token {i} is empty ({token!r}; the CoNLL-U reader refuses an empty FORM)"
    for column in _COLUMNS[1:]:
        value = row.get(column)
        if value is not None and len(value) != len(tokens):
            return f"column {column} has {len(value)} values for {len(tokens)} tokens"
    return None


def conllu_dataset(path: str | Path, language: str | None = None, on_error: str = "raise"):
    """A CoNLL-U file (validated by [read_conllu][subnets.data.treebank.read_conllu]) as a
    ``datasets.Dataset`` in the ``universal_dependencies`` layout: ``idx``, ``text``, ``tokens``,
    ``upos``, ``head`` (strings, as on the Hub) and ``deprel``, one row per sentence, plus a
    ``language`` column holding ``language`` if given (what
    [SubnetworkTrainer][subnets.hf.trainer.SubnetworkTrainer] reads). ``save_to_disk`` of a ``DatasetDict`` of
    such splits is a treebank folder subnets reads."""
    from datasets import Dataset

    from subnets.data.treebank import read_conllu

    sentences = read_conllu(path, on_error).examples
    columns = {
        "idx": [s.sent_id for s in sentences],
        "text": [
            (s.tokens.metadata.get("text", "") if s.tokens is not None else "") or " ".join(s.forms)
            for s in sentences
        ],
        "tokens": [list(s.forms) for s in sentences],
        "upos": [list(s.upos) for s in sentences],
        "head": [[str(h) for h in s.heads] for s in sentences],
        "deprel": [list(s.deprels) for s in sentences],
    }
    if language is not None:
        columns["language"] = [language] * len(sentences)
    return Dataset.from_dict(columns)
