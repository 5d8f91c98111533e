"""Sharded training with FSDP2 (``train.parallel=fsdp`` under ``torchrun``).

[shard_model][subnets.parallel.sharding.shard_model] applies ``torch.distributed.fsdp.fully_shard`` to every
transformer layer (its own all-gather and reduce-scatter group) and then to the whole task model (the
embeddings, the final norm and the task head in one group). Each parameter becomes a DTensor sharded on its
first dimension; gradients and optimizer state (created like the parameters) are sharded the
same way, so a process holds about ``1 / world_size`` of them.

Masks are per coordinate of a whole parameter: [local_mask][subnets.parallel.sharding.local_mask] cuts a whole mask to
the coordinates this process holds (``distribute_tensor`` with the parameter's mesh and placements,
without communication), and [MaskedOptimizer][subnets.optim.MaskedOptimizer] updates only local shards.
[local][subnets.parallel.sharding.local] is the local shard of a DTensor (or the tensor itself).

Checkpoints: [save_sharded][subnets.parallel.sharding.save_sharded] and
[load_sharded][subnets.parallel.sharding.load_sharded] write and read a folder with ``torch.distributed.checkpoint``
(each process its own shards, nothing gathered on one process);
[consolidated_model_state][subnets.parallel.sharding.consolidated_model_state] reads such a folder back whole, in one
process.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from subnets.models.layouts import layer_list
from subnets.runs.checkpoint_schema import Key


def shard_model(model: nn.Module, layers: Sequence[nn.Module], bf16: bool = False) -> None:
    """Shard ``model`` in place over the default process group: each of ``layers`` (the
    transformer's layers) as its own FSDP2 unit, then ``model`` itself for what remains.

    With ``bf16``, the layers' parameters are all-gathered and computed in bfloat16, their
    gradients reduced in float32, and the sharded parameters (and the optimizer) stay float32
    (FSDP2's ``MixedPrecisionPolicy``); the rest of the model keeps float32.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for layer in layers:
        fully_shard(layer, **({"mp_policy": policy} if policy else {}))
    # FSDP2 shards no scalar (e.g. a scalar mix's gamma): those stay whole on every process, and
    # the training step averages their gradients itself (local tensors, not DTensors)
    fully_shard(model, ignored_params={p for p in model.parameters() if p.dim() == 0})
    if hasattr(model, "predict"):  # a task model's decoding runs its forward pass: gather for it too
        register_fsdp_forward_method(model, "predict")


def shard_task_model(model: nn.Module, optimizer: torch.optim.Optimizer, bf16: bool = False) -> None:
    """[shard_model][subnets.parallel.sharding.shard_model] of a subnets task model (the layers of its encoder's
    transformer, by its gates' layout), and point its gates' ownership records and ``optimizer`` (built
    before, with no state yet) at the sharded parameters. Tensors in ``optimizer`` that are not the
    model's parameters (a policy's gate logits) stay; a [MaskedOptimizer][subnets.optim.MaskedOptimizer]'s
    names follow."""
    if optimizer.state:
        raise ValueError("shard_task_model: the optimizer already holds state; shard the model first")
    names = {id(p): name for name, p in model.named_parameters()}
    shard_model(model, layer_list(model.encoder.transformer, model.gates.layout.attention.layers), bf16)
    sharded = dict(model.named_parameters())
    replacements = {key: sharded[name] for key, name in names.items()}
    model.gates.replace_parameters(replacements)
    for group in optimizer.param_groups:
        group["params"] = [replacements.get(id(p), p) for p in group["params"]]
    if hasattr(optimizer, "names"):
        optimizer.names = {name: sharded.get(name, p) for name, p in optimizer.names.items()}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The coordinates of ``tensor`` this process holds: a DTensor's local shard (a view: in-place
    changes reach the DTensor), any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_mask(mask: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """The part of ``mask`` (the shape of the whole ``parameter``) that lies on this process's
    shard of ``parameter``; ``mask`` itself for a parameter that is not sharded."""
    if not isinstance(parameter, DTensor) or isinstance(mask, DTensor):
        return local(mask)
    mask = mask.to(parameter.device_mesh.device_type)
    return distribute_tensor(mask, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()


def save_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Write ``model``'s (and ``optimizer``'s) state to ``folder`` with
    ``torch.distributed.checkpoint``: every process writes its own shards (collective: call it on
    every process). Written to ``<folder>.partial`` and renamed, so that a crash leaves no folder
    under the final name."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    state = {Key.MODEL: get_model_state_dict(model)}
    if optimizer is not None:
        state[Key.OPTIMIZER] = get_optimizer_state_dict(model, optimizer)
    if torch.distributed.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    torch.distributed.barrier()
    dcp.save(state, checkpoint_id=partial)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    torch.distributed.barrier()
    return folder


def load_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Read what [save_sharded][subnets.parallel.sharding.save_sharded] wrote into the sharded ``model`` (and
    ``optimizer``), each process its own shards (collective). The folder may have been written by any number
    of processes (``torch.distributed.checkpoint`` reshards).

    A parameter that had no optimizer state when the folder was written (one no step has
    updated yet: a part of the model the task does not use, or units no language's mask lets
    move) gets none after loading either, as in the run that wrote it."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: the sharded checkpoint is missing")
    state = {Key.MODEL: get_model_state_dict(model)}
    if optimizer is not None:
        # reading a fresh optimizer's state dict gives every parameter state; keep the saved ones
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        state[Key.OPTIMIZER] = get_optimizer_state_dict(model, optimizer)
        state[Key.OPTIMIZER]["state"] = {
            name: values for name, values in state[Key.OPTIMIZER]["state"].items()
            if any(f"{Key.OPTIMIZER}.state.{name}.{key}" in saved for key in values)
        }  # fmt: skip
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state[Key.MODEL])
    if optimizer is not None:  # not strict: the parameters left without state stay so
        options = StateDictOptions(strict=False)
        set_optimizer_state_dict(model, optimizer, state[Key.OPTIMIZER], options=options)


def consolidated_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The whole model state (parameter name -> full tensor, on the CPU) of a checkpoint folder
    written by [save_sharded][subnets.parallel.sharding.save_sharded], read in one process without a process group (the
    optimizer state in the folder is not read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the sharded checkpoint is missing")
    entries = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    prefix = f"{Key.MODEL}."
    model = {
        key[len(prefix) :]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in entries.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({Key.MODEL: model}, checkpoint_id=folder, no_dist=True)
    return model
