"""Checkpoints as single safetensors files, written atomically, and the generator states they hold.

A checkpoint is one nested dictionary (model, optimizer, scheduler, step, config, method state,
sampler and RNG states). Its tensors are stored as safetensors tensors; everything else (numbers,
strings, lists, dictionaries with any keys) is stored as JSON in the file's metadata, with a
reference where each tensor was. The file is written to a temporary name and renamed, so a
crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from subnets.files import atomic_write

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
    """Write the nested ``state`` to ``path`` (atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors)
    metadata = {"format": "subnets-checkpoint-1", "state": json.dumps(skeleton)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a subnets checkpoint (not safetensors: {error})") from error
    if metadata.get("format") != "subnets-checkpoint-1":
        raise ValueError(f"{path} is not a subnets checkpoint (format {metadata.get('format')!r})")
    return _unflatten(json.loads(metadata["state"]), tensors)


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
    """Restore the generators from :func:`rng_state`'s result."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
