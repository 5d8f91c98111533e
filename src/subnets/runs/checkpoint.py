"""Checkpoints as single safetensors files, written atomically, and the generator states they hold.

A checkpoint is one nested dictionary (model, optimizer, scheduler, step, config, method state,
sampler and RNG states; its keys: [Key][subnets.runs.checkpoint_schema.Key]). Its tensors are stored as
safetensors tensors; everything else (numbers, strings, lists, dictionaries with any keys) is
stored as JSON in the file's metadata, with a reference where each tensor was. The file is
written to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subnets.files import load_safetensors, save_safetensors
from subnets.runs.checkpoint_schema import Key

log = logging.getLogger(__name__)
_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in (_TENSOR, _DICT, _TUPLE) for k in value):
            return {k: _flatten(v, tensors) for k, v in value.items()}
        return {_DICT: [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_flatten(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_flatten(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint: {value!r:.80}")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _DICT in value:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value[_DICT]}
        if _TUPLE in value:
            return tuple(_unflatten(v, tensors) for v in value[_TUPLE])
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the nested ``state`` to ``path`` (atomically; the same state gives the same bytes)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors)
    return save_safetensors(path, tensors, {"format": "subnets-checkpoint-1", "state": skeleton})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``."""
    tensors, header = load_safetensors(path, str(device), "subnets checkpoint")
    if header.get("format") != "subnets-checkpoint-1":
        raise ValueError(f"{path} is not a subnets checkpoint (format {header.get('format')!r})")
    state = header["state"]
    return _unflatten(json.loads(state) if isinstance(state, str) else state, tensors)


def drop_optimizer_state(path: str | os.PathLike) -> None:
    """Rewrite the checkpoint at ``path`` without its optimizer state (a finished run's, with
    ``train.keep_optimizer_state=false``); a no-op where it is already gone."""
    path = Path(path)
    if not path.exists():
        return
    state = load_checkpoint(path)
    if Key.OPTIMIZER in state:
        before = path.stat().st_size
        del state[Key.OPTIMIZER]
        save_checkpoint(path, state)
        log.info("dropped the optimizer state from %s: %.1f MB -> %.1f MB", path, before / 1e6,
                 path.stat().st_size / 1e6)  # fmt: skip


def checkpoint_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config a checkpoint recorded (None if it holds none), read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    try:
        state = json.loads(metadata["subnets"])["state"]
        state = json.loads(state) if isinstance(state, str) else state
    except (KeyError, TypeError, ValueError):
        return None
    return state.get(Key.CONFIG) if isinstance(state, dict) else None


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                     described_by: str = "the settings") -> None:  # fmt: skip
    """``model.load_state_dict(state)``, where a checkpoint that does not fit is a ValueError
    naming the checkpoint ``path``, what ``described_by`` the model (e.g. a run.json), and the
    first tensors that differ (instead of torch's size-mismatch traceback)."""
    own = model.state_dict()
    problems = [f"{name} has shape {list(t.shape)} in the checkpoint, {list(own[name].shape)} in the model"
                for name, t in state.items() if name in own and own[name].shape != t.shape]  # fmt: skip
    problems += [f"{name} is missing from the checkpoint" for name in own if name not in state]
    problems += [f"{name} is in the checkpoint, not in the model" for name in state if name not in own]
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"{path} does not fit the model {described_by} describes: {listed}")
    model.load_state_dict(state)


@contextlib.contextmanager
def phase_rng(seed: int, phase: str, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a phase (a mask search, a few-shot repetition) on torch's global generators forked
    and seeded from the run's ``seed`` and the ``phase`` name: what it draws does not depend on
    what ran before, and it leaves the generators as it found them."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(f"{seed}/{phase}".encode()))
        yield


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from ``rng_state``'s result."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def remove_stale_shards(folder: Path, kind: str, kept: str) -> None:
    """Delete the sharded checkpoints ``<kind>-<step>.dcp`` in ``folder`` other than ``kept``."""
    for stale in folder.glob(f"{kind}-*.dcp"):
        if stale.name != kept:
            shutil.rmtree(stale, ignore_errors=True)
