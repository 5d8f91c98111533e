"""Finding each language's data files in a folder.

Three layouts are recognised under a root folder, and may be mixed:

* ``<code>/{train,dev,test}<suffix>`` (the layout of ``shared/data/ud``), the code being the
  folder name, e.g. ``en_ewt/train.conllu``; the task says which suffixes it reads, in order of
  preference (``subnets.tasks.Task.suffixes``: ``.conllu`` for UD tasks, ``.conll`` for
  NER, ``.jsonl`` or ``.tsv`` for classification, ``.txt`` or ``.conllu`` for language
  modelling);
* the official UD release layout ``UD_<Language>-<Treebank>/<code>-ud-<split>.conllu``, e.g.
  ``UD_English-EWT/en_ewt-ud-train.conllu`` (for tasks that read CoNLL-U);
* ``<code>/`` written by ``datasets``' ``save_to_disk`` (``subnets.data.hf``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from subnets.data.hf import dataset_splits

SPLITS = ("train", "dev", "test")
_RELEASE_FILE = re.compile(r"(?P<code>[a-z]+_[a-z0-9]+)-ud-(?P<split>train|dev|test)\.conllu\Z")


@dataclass
class LanguageFiles:
    """The split files of one language; ``files`` maps split name to path (``tried``: the file
    names a split was looked for under, for messages)."""

    code: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    tried: tuple[str, ...] = ()

    def path(self, split: str) -> Path:
        if split not in self.files:
            looked = f"; tried {', '.join(split + s for s in self.tried)}" if self.tried else ""
            raise FileNotFoundError(
                f"language {self.code} in {self.folder} has no {split} split "
                f"(it has: {', '.join(self.files) or 'none'}{looked})"
            )
        return self.files[split]


def discover_languages(
    root: str | os.PathLike, suffixes: Sequence[str] = (".conllu",)
) -> dict[str, LanguageFiles]:
    """Map each language code found under ``root`` to its split files with one of ``suffixes``
    (the first found per split), or its ``datasets`` split folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root folder not found: {root} (set languages.ud_root or SUBNETS_UD_ROOT)"
        )
    found: dict[str, LanguageFiles] = {}

    def language(code: str, folder: Path) -> LanguageFiles:
        entry = found.setdefault(code, LanguageFiles(code, folder, tried=tuple(suffixes)))
        if entry.folder != folder:
            raise ValueError(f"language code {code} found in two folders: {entry.folder} and {folder}")
        return entry

    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        splits = dataset_splits(folder)
        if splits:
            language(folder.name, folder).files.update(splits)
            continue
        for split in SPLITS:
            file = next(
                (folder / f"{split}{s}" for s in suffixes if (folder / f"{split}{s}").is_file()), None
            )
            if file is not None:
                language(folder.name, folder).files[split] = file
        if ".conllu" in suffixes:
            for file in sorted(folder.glob("*-ud-*.conllu")):
                match = _RELEASE_FILE.match(file.name)
                if match:
                    language(match["code"], folder).files.setdefault(match["split"], file)
    return found


def select_languages(
    available: dict[str, LanguageFiles],
    codes: Iterable[str],
    setting: str,
    root: str | os.PathLike = "",
    suffixes: Sequence[str] = (".conllu",),
) -> list[LanguageFiles]:
    """The languages named by ``codes``; an unknown code raises an error listing what is
    available (and, for a folder that exists without the task's files, what was looked for)."""
    codes = list(codes)
    unknown = [c for c in codes if c not in available]
    if unknown:
        folder = Path(root) / unknown[0] if root else None
        if folder is not None and folder.is_dir():
            tried = ", ".join(split + s for split in SPLITS for s in suffixes)
            raise ValueError(f"{setting}: {unknown[0]} has no data files for this task in {folder} (tried {tried} "
                             f"and a datasets folder); languages with data: {', '.join(sorted(available)) or 'none'}")  # fmt: skip
        raise ValueError(
            f"{setting}: unknown language code(s) {', '.join(unknown)}"
            + (f" under {root}" if root else "")
            + f"; available: {', '.join(sorted(available)) or 'none'}"
            + (f" (name your folder's languages: {setting}=[code,...]; the defaults are those of another "
               "languages= group)" if root and not set(codes) & set(available) else "")
        )  # fmt: skip
    return [available[c] for c in codes]


def manifest_targets(
    root: str | os.PathLike, available: dict[str, LanguageFiles], exclude: Iterable[str] = ()
) -> list[str]:
    """Target languages of a UD root (``languages.target=[auto]``): the treebanks its
    ``MANIFEST.json`` gives the role ``test``, plus every treebank found under ``root`` that the
    manifest does not list (so a language is added by dropping its folder in), minus ``exclude``
    (the training and development languages). Without a manifest: every treebank not excluded."""
    path = Path(root) / "MANIFEST.json"
    listed: dict[str, str] = {}
    if path.exists():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            listed = {entry["code"]: entry.get("role", "") for entry in entries}
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"{path}: expected a JSON list of objects with 'code' and 'role' ({error})"
            ) from error
    excluded = set(exclude)
    return [code for code in sorted(available) if code not in excluded and listed.get(code, "test") == "test"]
