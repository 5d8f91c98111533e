"""Data-parallel training under ``torchrun`` (torch.distributed: gloo on CPU, NCCL on GPU).

Every process draws the same language and the same batch of ``batch_size x world_size``
sentences (the samplers share their seed) and trains on its own slice of it; gradients, gate
gradients and the loss are averaged over processes, weighted by words, before the (masked)
update, so masks and parameters stay identical on every rank and a step equals one step on
the combined batch. Only rank 0 evaluates and writes checkpoints, logs and results.

Sharded (``train.parallel=fsdp``, [subnets.parallel.sharding][]): FSDP2 averages the parameters'
gradients itself (each process's loss is scaled by its share of the batch's words first, so
the average is the combined batch's gradient); every process takes part in each forward pass,
so all of them evaluate (the same sentences, the same numbers) and write their shards of each
checkpoint, and rank 0 alone writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from subnets.config.rules import SettingError


@dataclass
class DataParallel:
    """This process's place in a data-parallel job (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether this object started the process group (and ends it)
    device: str = "cpu"  # where collectives run: the process's GPU with NCCL, else the CPU
    sharded: bool = False  # FSDP2 (train.parallel=fsdp): parameters sharded over the processes

    @classmethod
    def from_environment(cls, device: str, sharded: bool = False) -> DataParallel:
        """Join the job ``torchrun`` describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (if any).

        The backend is NCCL when the run uses CUDA (``device`` ``auto`` on a GPU machine, or
        ``cuda``), gloo otherwise. ``sharded`` (``train.parallel=fsdp``) needs ``torchrun``, even
        for one process (FSDP2 shards over a process group).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if sharded and "RANK" not in os.environ:
            raise SettingError(
                "train.parallel=fsdp shards the model over the processes torchrun starts; launch with "
                "`torchrun --nproc_per_node=N -m subnets.train train.parallel=fsdp ...` (or train.parallel=ddp "
                "for one process)"
            )
        if world_size == 1 and not sharded:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        owns = not dist.is_initialized()
        if owns:
            if cuda:
                torch.cuda.set_device(local_rank)
            # Other ranks wait while rank 0 searches masks or evaluates: allow for long waits.
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
        nccl = dist.get_backend() == "nccl"
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns,
                   f"cuda:{local_rank}" if nccl else "cpu", sharded)  # fmt: skip

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This process's share of a batch drawn identically on every process."""
        return list(indices[self.rank :: self.world_size])

    def sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its sum over processes (one all-reduce)."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float32) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n

    def mean(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its mean over processes."""
        if self.world_size == 1 or not tensors:
            return
        self.sum(tensors)
        for tensor in tensors:
            tensor.div_(self.world_size)

    def average(self, tensors: Sequence[torch.Tensor], weight: float) -> float:
        """Replace each tensor, in place, by its ``weight``-weighted mean over processes;
        returns the total weight. Nothing happens in a single process."""
        if self.world_size == 1:
            return weight
        total = torch.tensor([float(weight)])
        for tensor in tensors:
            tensor.mul_(weight)
        self.sum([*tensors, total])
        for tensor in tensors:
            tensor.div_(float(total))
        return float(total)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (pickled; for setup-time state such as masks)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process."""
        if self.world_size == 1:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (pickled)."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this object started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
