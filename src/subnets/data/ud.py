"""Finding Universal Dependencies treebanks in a folder.

Two layouts are recognised under a root folder, and may be mixed:

* ``<code>/{train,dev,test}.conllu`` (the layout of ``shared/data/ud``), the code being the
  folder name, e.g. ``en_ewt/train.conllu``;
* the official release layout ``UD_<Language>-<Treebank>/<code>-ud-<split>.conllu``, e.g.
  ``UD_English-EWT/en_ewt-ud-train.conllu``;
* ``<code>/`` written by ``datasets``' ``save_to_disk`` (:mod:`subnets.data.hf`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from subnets.data.hf import dataset_splits

SPLITS = ("train", "dev", "test")
_RELEASE_FILE = re.compile(r"(?P<code>[a-z]+_[a-z0-9]+)-ud-(?P<split>train|dev|test)\.conllu\Z")


@dataclass
class TreebankFiles:
    """The split files of one treebank; ``files`` maps split name to path."""

    code: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, split: str) -> Path:
        if split not in self.files:
            raise FileNotFoundError(
                f"treebank {self.code} in {self.folder} has no {split} split "
                f"(it has: {', '.join(self.files) or 'none'})"
            )
        return self.files[split]


def discover_treebanks(root: str | os.PathLike) -> dict[str, TreebankFiles]:
    """Map each treebank code found under ``root`` to its split files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"UD root folder not found: {root} (set languages.ud_root or SUBNETS_UD_ROOT)"
        )
    found: dict[str, TreebankFiles] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        splits = dataset_splits(folder)
        if splits:
            if folder.name in found:
                raise ValueError(f"treebank code {folder.name} found in two folders: "
                                 f"{found[folder.name].folder} and {folder}")  # fmt: skip
            found[folder.name] = TreebankFiles(folder.name, folder, splits)
            continue
        for file in sorted(folder.glob("*.conllu")):
            match = _RELEASE_FILE.match(file.name)
            if match:
                code, split = match["code"], match["split"]
            elif file.stem in SPLITS:
                code, split = folder.name, file.stem
            else:
                continue
            treebank = found.setdefault(code, TreebankFiles(code, folder))
            if treebank.folder != folder:
                raise ValueError(f"treebank code {code} found in two folders: {treebank.folder} and {folder}")
            treebank.files[split] = file
    return found


def select_treebanks(
    available: dict[str, TreebankFiles], codes: Iterable[str], setting: str, root: str | os.PathLike = ""
) -> list[TreebankFiles]:
    """The treebanks named by ``codes``; an unknown code raises an error listing what is available."""
    codes = list(codes)
    unknown = [c for c in codes if c not in available]
    if unknown:
        raise ValueError(
            f"{setting}: unknown language code(s) {', '.join(unknown)}"
            + (f" under {root}" if root else "")
            + f"; available: {', '.join(sorted(available)) or 'none'}"
        )
    return [available[c] for c in codes]


def manifest_targets(
    root: str | os.PathLike, available: dict[str, TreebankFiles], exclude: Iterable[str] = ()
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
