"""Data-parallel training under ``torchrun`` (torch.distributed: gloo on CPU, NCCL on GPU).

Every process draws the same language and the same batch of ``batch_size x world_size``
sentences (the samplers share their seed) and trains on its own slice of it; gradients, gate
gradients and the loss are averaged over processes, weighted by words, before the (masked)
update, so masks and parameters stay identical on every rank and a step equals one step on
the combined batch. Only rank 0 evaluates and writes checkpoints, logs and results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DataParallel:
    """This process's place in a data-parallel job (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether this object started the process group (and ends it)
    device: str = "cpu"  # where collectives run: the process's GPU with NCCL, else the CPU

    @classmethod
    def from_environment(cls, device: str) -> DataParallel:
        """Join the job ``torchrun`` describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (if any).

        The backend is NCCL when the run uses CUDA (``device`` ``auto`` on a GPU machine, or
        ``cuda``), gloo otherwise.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
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
        return cls(
            dist.get_rank(), dist.get_world_size(), local_rank, owns, f"cuda:{local_rank}" if nccl else "cpu"
        )

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

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this object started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
