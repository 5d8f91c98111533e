"""Exact masked updates around any torch optimizer.

Zeroing gradients does not freeze a parameter: AdamW's weight decay and its moment estimates,
SGD's momentum, still move it. [MaskedOptimizer][subnets.optim.masked.MaskedOptimizer] makes a step taken with
a mask exact by saving what the mask protects, letting the wrapped optimizer step, and writing it back;
for torch's Adam and AdamW, by running Adam's own update on the coordinates the mask lets move
and on nothing else (the same numbers, at less than the cost of a whole step on large models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.optim.adam import adam

from subnets.optim.frozen import FrozenCoordinates
from subnets.parallel.sharding import local

MaskKey = str | nn.Parameter | torch.Tensor


class MaskedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that ``step(update_mask=...)`` changes only the masked-in coordinates.

    ``update_mask`` maps parameters (by name or by tensor) to boolean tensors of their shape:
    True where the step may change the parameter. Parameters not in the mapping are updated as
    usual, and ``step()`` without a mask is the wrapped optimizer's plain step. A loop that calls
    ``step()`` itself (the Hugging Face ``Trainer``, an ``accelerate`` loop) gets masked steps by
    setting the attribute ``update_mask`` before the step instead.

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

    Sharded parameters (DTensors, as FSDP2 makes them: [subnets.parallel.sharding][]) take whole
    masks too: each process saves and restores only the coordinates of its own shard, so the
    step is the unsharded step, shard by shard (whether a tensor is masked entirely is decided
    on the whole mask, so every process skips or steps it alike).

    For torch's Adam and AdamW (without amsgrad, fused or capturable updates), the step runs
    Adam's own update on the coordinates the mask lets move and on nothing else, which costs
    less than a step of the whole model; other optimizers step every coordinate, then the
    frozen ones are written back (``adam_in_place = False`` takes that path for Adam too).

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
        self._frozen_cache: dict[int, tuple[torch.Tensor, FrozenCoordinates]] = {}
        self._plans: dict[int, tuple[UpdateMask, list]] = {}
        self._block_cache: dict[tuple, tuple] = {}
        # what step() without an update_mask uses: set it where a loop you do not own calls step()
        # (the Hugging Face Trainer, accelerate's prepared optimizer)
        self.update_mask: Mapping[MaskKey, torch.Tensor] | None = None
        # torch's Adam and AdamW update only the coordinates a mask lets move (no save and
        # restore: faster, the same numbers); False: every optimizer takes the general path
        self.adam_in_place = True

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

    def _frozen(self, mask: torch.Tensor, parameter: torch.Tensor) -> FrozenCoordinates:
        """Where ``mask`` is False. The plan is cached per mask object and reused only while
        the mask's content is unchanged (compared each step: cheap next to the step itself)."""
        key = (id(mask), id(parameter))
        cached = self._frozen_cache.get(key)
        if cached is not None and cached[0].shape == mask.shape and torch.equal(cached[0], mask.bool()):
            return cached[1]
        if len(self._frozen_cache) > 512:
            self._frozen_cache.clear()
        frozen = FrozenCoordinates(mask, parameter)
        self._frozen_cache[key] = (mask.bool().clone(), frozen)
        return frozen

    @torch.no_grad()
    def mask_gradients(self, update_mask: Mapping[MaskKey, torch.Tensor]) -> None:
        """Zero the gradients outside ``update_mask`` (what
        [step][subnets.optim.masked.MaskedOptimizer.step] with it would leave unused; before clipping, so that
        the norm counts only the coordinates the step updates)."""
        _zero_frozen_gradients(
            [
                (p, frozen)
                for p, frozen in self._resolve(update_mask)
                if p.grad is not None and not frozen.none
            ]
        )

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        update_mask: Mapping[MaskKey, torch.Tensor] | None = None,
    ):
        """One step; with ``update_mask`` (default: the attribute ``update_mask``), coordinates
        outside it stay bit-identical (class docstring)."""
        if update_mask is None:
            update_mask = self.update_mask
        if not update_mask:
            return self.optimizer.step(closure)
        resolved = self._resolve(update_mask)
        skipped, partial = [], []
        for parameter, frozen in resolved:
            if parameter.grad is None:
                continue
            if frozen.all:
                skipped.append((parameter, parameter.grad))
                parameter.grad = None  # the optimizer skips it: no decay, no state change
            elif not frozen.none:
                partial.append((parameter, frozen))
        _zero_frozen_gradients(partial)
        if (
            closure is None
            and self.adam_in_place
            and _adam_in_place(self.optimizer, partial, self._block_cache)
        ):
            for parameter, grad in skipped:
                parameter.grad = grad
            return None
        # Save the frozen coordinates of each parameter and its state tensors, step, write them back.
        blocks, saved, unstructured, fresh = [], [], [], []
        for parameter, frozen in partial:
            state = self.optimizer.state.get(parameter)
            fresh.append((parameter, frozen, set(state or ())))
            tensors = (
                (parameter, *(v for v in state.values() if _same_shape(v, parameter)))
                if state
                else (parameter,)
            )
            tensors = tuple(map(local, tensors))
            if frozen.mask_only:
                unstructured += [(t, frozen.mask, t.clone()) for t in tensors]
                continue
            views, buffers = self._blocks(frozen, tensors)
            blocks += views
            saved += buffers
        if blocks:
            torch._foreach_copy_(saved, blocks)
        try:
            loss = self.optimizer.step(closure)
        finally:
            for parameter, grad in skipped:
                parameter.grad = grad
        if blocks:
            torch._foreach_copy_(blocks, saved)
        for tensor, mask, old in unstructured:
            torch.where(mask, old, tensor, out=tensor)
        # State the step created for the first time starts at zero on frozen coordinates.
        for parameter, frozen, before in fresh:
            for key, tensor in self.optimizer.state.get(parameter, {}).items():
                if key not in before and _same_shape(tensor, parameter):
                    frozen.zero(local(tensor))
        return loss

    def _resolve(
        self, update_mask: Mapping[MaskKey, torch.Tensor]
    ) -> list[tuple[torch.Tensor, FrozenCoordinates]]:
        """``(parameter, frozen coordinates)`` for every entry, validated before anything changes.
        An [UpdateMask][subnets.optim.masked.UpdateMask] is resolved once per optimizer; a plain mapping at
        every step (the plan of each mask is cached while its content is unchanged)."""
        if isinstance(update_mask, UpdateMask):
            cached = self._plans.get(id(update_mask))
            if cached is not None and cached[0] is update_mask:
                return cached[1]
        resolved = []
        for key, mask in update_mask.items():
            parameter = self._parameter(key)
            if tuple(mask.shape) != tuple(parameter.shape):
                raise ValueError(f"update_mask for {key if isinstance(key, str) else 'a parameter'}: shape "
                                 f"{tuple(mask.shape)}, parameter shape {tuple(parameter.shape)}")  # fmt: skip
            resolved.append(
                (
                    parameter,
                    FrozenCoordinates(mask, parameter)
                    if isinstance(update_mask, UpdateMask)
                    else self._frozen(mask, parameter),
                )
            )
        if isinstance(update_mask, UpdateMask):
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[id(update_mask)] = (update_mask, resolved)  # holds it: its id is not reused
        return resolved

    def _blocks(self, frozen: FrozenCoordinates, tensors: tuple[torch.Tensor, ...]) -> tuple[list, list]:
        """Views of ``frozen``'s blocks in ``tensors`` and buffers to save them in, cached while
        the tensors are the same objects (an optimizer updates its state in place)."""
        key = (id(frozen), *map(id, tensors))
        cached = self._block_cache.get(key)
        if cached is None or cached[0] is not frozen or any(a is not b for a, b in zip(cached[1], tensors)):
            if len(self._block_cache) > 4096:
                self._block_cache.clear()
            views = [v for t in tensors for v in frozen.blocks(t)]
            cached = (
                frozen,
                tensors,
                views,
                [torch.empty_like(v) for v in views],
            )  # holds them: ids not reused
            self._block_cache[key] = cached
        return cached[2], cached[3]

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
        self._block_cache.clear()  # it holds the replaced state tensors (and their buffers)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r})"


def _zero_frozen_gradients(frozen_of: list[tuple[torch.Tensor, FrozenCoordinates]]) -> None:
    """Zero each parameter's gradient (it has one) at its frozen coordinates."""
    blocks = []
    for parameter, frozen in frozen_of:
        if frozen.mask_only:
            local(parameter.grad).masked_fill_(frozen.mask, 0.0)
        else:
            blocks += frozen.blocks(local(parameter.grad))
    if blocks:
        torch._foreach_zero_(blocks)


def _adam_in_place(
    optimizer: torch.optim.Optimizer, partial: list[tuple[torch.Tensor, FrozenCoordinates]], cache: dict
) -> bool:
    """The step of torch's Adam or AdamW (plain settings: no amsgrad, fused, capturable or
    differentiable update, no gradient scaler) taken on the coordinates the masks let move
    and on nothing else, instead of saving and restoring the frozen ones: a parameter frozen
    in runs of rows or columns enters the update as views of its other runs, with the views
    of its moment estimates and a copy of its step count per view (the count itself advanced
    once). The same element-wise arithmetic as the wrapped step; returns False (nothing
    done) where it does not apply."""
    plain = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and not getattr(
        optimizer, "grad_scale", None
    )
    groups = optimizer.param_groups
    if not plain or any(g["amsgrad"] or g["fused"] or g["capturable"] or g["differentiable"] for g in groups):
        return False
    plans = {id(parameter): frozen for parameter, frozen in partial}
    if any(frozen.mask_only for frozen in plans.values()):
        return False
    for group in groups:
        found: list[list[torch.Tensor]] = [[], [], [], [], []]  # parameters, gradients, moments, steps
        has_complex = optimizer._init_group(group, found[0], found[1], found[2], found[3], [], found[4])
        whole: list[list[torch.Tensor]] = [[], [], [], [], []]
        views: list[list[torch.Tensor]] = [[], [], [], [], []]
        advanced = []
        for parameter, *tensors in zip(*found):
            tensors = [local(parameter), *map(local, tensors[:3]), tensors[3]]
            frozen = plans.get(id(parameter))
            if frozen is None:
                for into, tensor in zip(whole, tensors):
                    into.append(tensor)
                continue
            advanced.append(tensors[4])
            kept = _updated_views(cache, frozen, (tensors[0], tensors[2], tensors[3]))
            for blocks in zip(kept[0], frozen.updated_blocks(tensors[1]), kept[1], kept[2]):
                for into, view in zip(views, [*blocks, tensors[4].clone()]):
                    into.append(view)
        beta1, beta2 = group["betas"]
        settings = dict(amsgrad=False, has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                        capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=group["decoupled_weight_decay"])  # fmt: skip
        adam(*whole[:4], [], whole[4], foreach=group["foreach"], **settings)
        if views[0]:  # many small views: one multi-tensor call (on the CPU, the same kernels per tensor)
            adam(*views[:4], [], views[4], foreach=True, **settings)
        for step in advanced:
            step += 1
    return True


def _updated_views(
    cache: dict, frozen: FrozenCoordinates, tensors: tuple[torch.Tensor, ...]
) -> list[list[torch.Tensor]]:
    """``FrozenCoordinates.updated_blocks`` of each of ``tensors`` (a parameter and its moment
    estimates, updated in place), cached while they are the same objects."""
    key = ("updated", id(frozen), *map(id, tensors))
    cached = cache.get(key)
    if cached is None or cached[0] is not frozen or any(a is not b for a, b in zip(cached[1], tensors)):
        if len(cache) > 4096:
            cache.clear()
        cached = (
            frozen,
            tensors,
            [frozen.updated_blocks(t) for t in tensors],
        )  # holds them: ids not reused
        cache[key] = cached
    return cached[2]


class UpdateMask(Mapping):
    """An update mask fixed once: parameter name (or tensor) -> boolean mask of its shape, the
    masks copied at construction, so that later changes to the given tensors do not reach it.
    [MaskedOptimizer][subnets.optim.masked.MaskedOptimizer] plans the frozen coordinates of an ``UpdateMask``
    once and reuses the plan at every step without reading the masks again (a plain mapping is checked at
    every step): what the subnetwork policies pass for each language.

    Example::

        mask = UpdateMask({"encoder.layer.0.attention.self.query.weight": rows_of_kept_heads})
        optimizer.step(update_mask=mask)
    """

    def __init__(self, masks: Mapping[MaskKey, torch.Tensor]):
        self._masks = {key: mask.detach().bool().clone() for key, mask in masks.items()}

    def __getitem__(self, key: MaskKey) -> torch.Tensor:
        return self._masks[key]

    def __iter__(self):
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)


def _same_shape(value, parameter: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == parameter.shape and value.dim() > 0
