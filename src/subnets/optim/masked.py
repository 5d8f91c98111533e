"""Exact masked updates around any torch optimizer.

Zeroing gradients does not freeze a parameter: AdamW's weight decay and its moment estimates,
SGD's momentum, still move it. :class:`MaskedOptimizer` makes a step taken with a mask exact
by saving what the mask protects, letting the wrapped optimizer step, and writing it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

MaskKey = str | nn.Parameter | torch.Tensor


class MaskedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that ``step(update_mask=...)`` changes only the masked-in coordinates.

    ``update_mask`` maps parameters (by name or by tensor) to boolean tensors of their shape:
    True where the step may change the parameter. Parameters not in the mapping are updated as
    usual, and ``step()`` without a mask is the wrapped optimizer's plain step.

    Semantics of a masked step, for a coordinate where the mask is False:

    * its value is left bit-identical, whatever the optimizer (weight decay included);
    * its optimizer state is **frozen, not advanced**: every state tensor of the parameter's
      shape (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``, RMSprop's
      ``square_avg``, Adagrad's ``sum``, ...) keeps its value at that coordinate, so moments
      are not decayed while a coordinate sits outside the mask. State a step creates for the
      first time is zero at masked coordinates (the initial value of Adam's, RMSprop's and
      Adamax's state; SGD would have started its momentum at the first gradient, and Rprop
      its step sizes at ``lr``, so a coordinate masked at Rprop's first step hardly moves later:
      take one unmasked step first with such optimizers);
    * when the coordinate re-enters a later mask, it continues from that frozen state;
    * per-tensor state (Adam's ``step`` counter, used for bias correction) advances whenever
      any coordinate of the tensor is updated; a tensor masked entirely is skipped, counters
      and all, exactly as if it had no gradient.

    Coordinates where the mask is True move exactly as the wrapped optimizer moves them (for
    element-wise optimizers: SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, ...; an optimizer that
    mixes coordinates, such as LBFGS, sees the masked gradient). Gradients at masked coordinates
    are zeroed before the step.

    The wrapper shares the wrapped optimizer's ``param_groups`` and ``state``, so learning-rate
    schedulers built on it, parameter groups and ``state_dict``/``load_state_dict`` behave as
    for the wrapped optimizer.

    Example::

        optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model.named_parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        loss.backward()
        optimizer.step(update_mask={"encoder.layer.0.attention.self.query.weight": rows_of_kept_heads})
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, nn.Parameter]] = ()
    ):
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._share_inner_state()
        self.names = dict(named_parameters)
        self._frozen_cache: dict[int, tuple[torch.Tensor, _Frozen]] = {}

    def _share_inner_state(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def _parameter(self, key: MaskKey) -> torch.Tensor:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(
                    f"update_mask names {key!r}, which is not among the optimizer's named parameters"
                )
            return self.names[key]
        return key

    def _frozen(self, mask: torch.Tensor) -> _Frozen:
        """Where ``mask`` is False. The plan is cached per mask object and reused only while
        the mask's content is unchanged (compared each step: cheap next to the step itself)."""
        cached = self._frozen_cache.get(id(mask))
        if cached is not None and cached[0].shape == mask.shape and torch.equal(cached[0], mask.bool()):
            return cached[1]
        if len(self._frozen_cache) > 512:
            self._frozen_cache.clear()
        frozen = _Frozen(mask)
        self._frozen_cache[id(mask)] = (mask.bool().clone(), frozen)
        return frozen

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        update_mask: Mapping[MaskKey, torch.Tensor] | None = None,
    ):
        """One step; with ``update_mask``, coordinates outside it stay bit-identical (class docstring)."""
        if not update_mask:
            return self.optimizer.step(closure)
        resolved = []
        for key, mask in update_mask.items():  # validate everything before changing anything
            parameter = self._parameter(key)
            if tuple(mask.shape) != tuple(parameter.shape):
                raise ValueError(f"update_mask for {key if isinstance(key, str) else 'a parameter'}: shape "
                                 f"{tuple(mask.shape)}, parameter shape {tuple(parameter.shape)}")  # fmt: skip
            resolved.append((parameter, mask))
        skipped, partial = [], []
        for parameter, mask in resolved:
            if parameter.grad is None:
                continue
            frozen = self._frozen(mask)
            if frozen.all:
                skipped.append((parameter, parameter.grad))
                parameter.grad = None  # the optimizer skips it: no decay, no state change
            elif not frozen.none:
                partial.append((parameter, frozen, set(self.optimizer.state.get(parameter, {}))))
        # Save the frozen coordinates of each parameter and its state tensors, step, write them back.
        blocks, rows, unstructured = [], [], []
        for parameter, frozen, _ in partial:
            state = self.optimizer.state.get(parameter, {})
            tensors = [parameter, *(v for v in state.values() if _same_shape(v, parameter))]
            frozen.zero(parameter.grad)
            if frozen.rows is not None:
                rows += [(t, frozen.rows, t.index_select(0, frozen.rows)) for t in tensors]
            elif frozen.runs:
                blocks += [b for t in tensors for b in frozen.blocks(t)]
            else:
                unstructured += [(t, frozen.mask, t.clone()) for t in tensors]
        saved = [torch.empty_like(b) for b in blocks]
        if blocks:
            torch._foreach_copy_(saved, blocks)
        try:
            loss = self.optimizer.step(closure)
        finally:
            for parameter, grad in skipped:
                parameter.grad = grad
        if blocks:
            torch._foreach_copy_(blocks, saved)
        for tensor, index, old in rows:
            tensor.index_copy_(0, index, old)
        for tensor, mask, old in unstructured:
            torch.where(mask, old, tensor, out=tensor)
        # State the step created for the first time starts at zero on frozen coordinates.
        for parameter, frozen, before in partial:
            for key, tensor in self.optimizer.state.get(parameter, {}).items():
                if key not in before and _same_shape(tensor, parameter):
                    frozen.zero(tensor)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if "names" not in self.__dict__:  # called by Optimizer.__init__ on the shared groups
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._share_inner_state()

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r})"


class _Frozen:
    """The coordinates a mask protects, in the cheapest form to save and restore. Whole rows
    (a mask constant along every other axis, as a head mask on query/key/value weights and
    biases): ``rows``, an index for ``index_select``/``index_copy_``. Whole columns of a 2-D
    tensor (a head mask on the output projection): ``runs`` of ``(start, length)`` copied as
    views in one fused call. Otherwise ``mask`` (True where frozen) with ``torch.where``."""

    max_runs = 64

    def __init__(self, mask: torch.Tensor):
        frozen = ~mask.bool()
        self.none, self.all = not bool(frozen.any()), bool(frozen.all())
        self.mask, self.rows, self.runs = frozen, None, []
        first_column = frozen.reshape(frozen.shape[0], -1)[:, 0] if frozen.dim() else frozen
        if frozen.dim() >= 1 and bool((frozen == first_column.view(-1, *[1] * (frozen.dim() - 1))).all()):
            self.rows = first_column.nonzero().squeeze(1)
        elif frozen.dim() == 2 and bool((frozen == frozen[:1]).all()):
            runs = _runs(frozen[0])
            if len(runs) <= self.max_runs:
                self.runs = runs

    def blocks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.narrow(1, start, length) for start, length in self.runs]

    def zero(self, tensor: torch.Tensor) -> None:
        if self.rows is not None:
            tensor.index_fill_(0, self.rows, 0.0)
        elif self.runs:
            torch._foreach_zero_(self.blocks(tensor))
        else:
            tensor.masked_fill_(self.mask, 0.0)


def _runs(line: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D boolean tensor as (start, length)."""
    runs, start = [], None
    for i, value in enumerate(line.tolist() + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _same_shape(value, parameter: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == parameter.shape and value.dim() > 0
