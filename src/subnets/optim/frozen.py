"""The coordinates an update mask protects, planned once per mask for
[MaskedOptimizer][subnets.optim.MaskedOptimizer]: as runs of whole rows or columns (views cheap to save,
restore or update) or, failing that, as the mask itself."""

from __future__ import annotations

import torch

from subnets.parallel.sharding import local_mask


class FrozenCoordinates:
    """The coordinates a mask protects, as blocks cheap to save and restore: runs of whole rows
    (a mask constant along every other axis, as a head mask on query/key/value weights and
    biases) or of whole columns of a 2-D tensor (a head mask on the output projection), copied
    as views in one fused call; otherwise (``mask_only``) ``mask`` (True where frozen) with
    ``torch.where``. For a sharded ``parameter``, the blocks and ``mask`` are those of its local
    shard; ``all`` (the whole tensor frozen) is the whole mask's."""

    max_runs = 256

    def __init__(self, mask: torch.Tensor, parameter: torch.Tensor | None = None):
        frozen = ~mask.bool()
        self.all = bool(frozen.all())
        if parameter is not None:
            frozen = local_mask(frozen, parameter)
        self.none = not bool(frozen.any())
        self.mask, self.dim, self.runs = frozen, 0, []
        if self.none:  # (also an empty shard)
            self.mask_only = False
            return
        first_column = frozen.reshape(frozen.shape[0], -1)[:, 0] if frozen.dim() else frozen
        if frozen.dim() >= 1 and bool((frozen == first_column.view(-1, *[1] * (frozen.dim() - 1))).all()):
            self.runs = runs_of(first_column)
        elif frozen.dim() == 2 and bool((frozen == frozen[:1]).all()):
            self.dim, self.runs = 1, runs_of(frozen[0])
        if len(self.runs) > self.max_runs:
            self.runs = []
        self.mask_only = not self.runs and not self.none

    def blocks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.narrow(self.dim, start, length) for start, length in self.runs]

    def updated_blocks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Views of the runs between the frozen ones (the coordinates a step updates)."""
        kept, start = [], 0
        for run_start, length in [*self.runs, (tensor.shape[self.dim], 0)]:
            if run_start > start:
                kept.append(tensor.narrow(self.dim, start, run_start - start))
            start = run_start + length
        return kept

    def zero(self, tensor: torch.Tensor) -> None:
        if self.mask_only:
            tensor.masked_fill_(self.mask, 0.0)
        else:
            torch._foreach_zero_(self.blocks(tensor))


def runs_of(line: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D boolean tensor as (start, length)."""
    runs, start = [], None
    for i, value in enumerate(line.tolist() + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i - start))
            start = None
    return runs
