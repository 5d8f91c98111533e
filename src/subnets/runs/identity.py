"""What a run folder holds a run of: the settings, the content of every data file read and the
model it started from, recorded in ``<folder>/run.json`` when the run starts.

A later command in the same folder (a resume, a rerun of a finished sweep) must describe the
same run: its settings may differ only in ``IGNORED`` keys (paths, logging, devices), the
data files it reads must have the same content (wherever the data root now is) and the model
the same weights, configuration and tokenizer. Otherwise it is refused, before any work, with
the differences listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnets.data.cache import sha256_path, tokenizer_fingerprint

# Settings that may change between a run and its resumption without changing its results. The
# data root and the model path are compared by content (run.json's "data" and "model") instead.
IGNORED = (
    "resume",
    "overwrite",
    "wandb.",
    "train.device",
    "train.log_every",
    "train.eval_batch_size",
    "train.keep_optimizer_state",
    "languages.ud_root",
    "languages.cache",
    "model.name_or_path",
    "analysis.",
    "method.report_order",
    "method.control_of",
)


def flat(container: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dictionary as ``{"a.b.c": value}``."""
    if isinstance(container, dict):
        out = {}
        for key, value in container.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: container}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs, ``IGNORED`` keys aside."""
    saved, current = flat(dict(saved)), flat(dict(current))
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key) and not key.startswith(IGNORED)
    ]


def data_fingerprint(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of each data file, keyed by its path relative to the data ``root``."""
    root = Path(root).resolve()
    out = {}
    for path in sorted({Path(p).resolve() for p in paths}):
        key = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        out[key] = sha256_path(path)
    return out


def model_fingerprint(model: nn.Module, tokenizer) -> dict[str, str]:
    """SHA-256 of the model's weights (as built, before training), of its configuration and of
    its tokenizer; the same checkpoint gives the same fingerprint wherever it is loaded from."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    config = getattr(model, "config", None)
    config_text = json.dumps(config.to_diff_dict(), sort_keys=True, default=str) if config is not None else ""
    return {
        "class": type(model).__name__,
        "weights": weights.hexdigest(),
        "config": hashlib.sha256(config_text.encode()).hexdigest(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The differences between two run identities (``{"config", "data", "model"}``)."""
    differences = config_differences(saved.get("config", {}), current.get("config", {}))
    if "data" in saved and "data" in current:
        old, new = saved["data"], current["data"]
        for path in sorted(set(old) | set(new)):
            if path not in new:
                differences.append(f"data: {path} is no longer read")
            elif path not in old:
                differences.append(f"data: {path} is read, the run did not read it")
            elif old[path] != new[path]:
                differences.append(
                    f"data: {path} has other content (sha256 {old[path][:12]} -> {new[path][:12]})"
                )
    if "model" in saved and "model" in current:
        for key in sorted(set(saved["model"]) | set(current["model"])):
            if saved["model"].get(key) != current["model"].get(key):
                differences.append(
                    f"model: other {key} ({saved['model'].get(key)!s:.12} -> {current['model'].get(key)!s:.12})"
                )
    return differences


def saved_identity(folder, config: Mapping[str, Any], resume: bool) -> dict | None:
    """The identity ``folder`` (a [RunFolder][subnets.runs.folder.RunFolder]) records, its settings
    checked against ``config`` before anything is written (the data and the model are checked
    once they are loaded: ``refuse`` with ``identity_differences``); None for a new folder."""
    from subnets.files import read_json

    path = folder.identity
    if not path.exists():
        if folder.last_checkpoint.exists():
            raise ValueError(f"{folder.root} holds a checkpoint but no run.json (a run of an earlier version of "
                             "subnets): its settings cannot be checked; use another folder (hydra.run.dir=...) "
                             "or overwrite=true")  # fmt: skip
        return None
    if not resume:
        raise FileExistsError(f"{folder.root} already holds a run ({path}); pass resume=true to continue it, "
                              "or choose another folder (hydra.run.dir=...)")  # fmt: skip
    saved = read_json(path, "the run's identity")
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{path}: expected a JSON object with the run's 'config' (the file is damaged)")
    refuse(folder.root, config_differences(saved["config"], config))
    return saved


def refuse(folder, differences: list[str]) -> None:
    """Raise naming ``differences`` between ``folder``'s run and this one, if there are any."""
    if differences:
        raise ValueError(
            f"{folder} holds another run: it differs from this one in\n  " + "\n  ".join(differences)
            + "\nUse the same settings, data and model, another run folder (hydra.run.dir=...) for a new "
            "run, or overwrite=true to replace it."
        )  # fmt: skip
