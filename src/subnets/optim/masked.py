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
      Adamax's state; SGD would have started its momentum at the first gradient);
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
        self._frozen_cache: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

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

    def _frozen_indices(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat indices where ``mask`` is False (cached while the mask object is unchanged)."""
        cached = self._frozen_cache.get(id(mask))
        if cached is not None and cached[0] is mask and cached[1] == mask._version:
            return cached[2]
        if len(self._frozen_cache) > 512:
            self._frozen_cache.clear()
        indices = (~mask.bool()).flatten().nonzero().squeeze(1)
        self._frozen_cache[id(mask)] = (mask, mask._version, indices)
        return indices

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        update_mask: Mapping[MaskKey, torch.Tensor] | None = None,
    ):
        """One step; with ``update_mask``, coordinates outside it stay bit-identical (class docstring)."""
        if not update_mask:
            return self.optimizer.step(closure)
        partial, skipped = [], []
        for key, mask in update_mask.items():
            parameter = self._parameter(key)
            if tuple(mask.shape) != tuple(parameter.shape):
                raise ValueError(f"update_mask for {key if isinstance(key, str) else 'a parameter'}: shape "
                                 f"{tuple(mask.shape)}, parameter shape {tuple(parameter.shape)}")  # fmt: skip
            if parameter.grad is None:
                continue
            frozen = self._frozen_indices(mask)
            if frozen.numel() == 0:
                continue
            if frozen.numel() == parameter.numel():
                skipped.append((parameter, parameter.grad))
                parameter.grad = None  # the optimizer skips it: no decay, no state change
                continue
            parameter.grad.view(-1).index_fill_(0, frozen, 0.0)
            state = self.optimizer.state.get(parameter, {})
            existing = {
                k: v.view(-1).index_select(0, frozen) for k, v in state.items() if _same_shape(v, parameter)
            }
            partial.append((parameter, frozen, parameter.view(-1).index_select(0, frozen), existing))
        try:
            loss = self.optimizer.step(closure)
        finally:
            for parameter, grad in skipped:
                parameter.grad = grad
        for parameter, frozen, value, existing in partial:
            parameter.view(-1).index_copy_(0, frozen, value)
            for key, tensor in self.optimizer.state.get(parameter, {}).items():
                if key in existing:
                    tensor.view(-1).index_copy_(0, frozen, existing[key])
                elif _same_shape(tensor, parameter):  # created by this step
                    tensor.view(-1).index_fill_(0, frozen, 0)
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


def _same_shape(value, parameter: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == parameter.shape and value.dim() > 0
