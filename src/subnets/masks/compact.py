"""Training the subnetworks alone, with gradients and optimizer state for their parameters only
(``masks.train=subnetwork``; [SubnetworkConfig][subnets.hf.SubnetworkConfig]'s ``train``).

A unit owns rows or columns of its projections ([subnets.models.ownership][]): a head its rows
of the query, key and value weights and its columns of the attention output projection, a neuron
its row of the feed-forward input projections and its column of the output projection. Under
[train_subnetworks_only][subnets.masks.compact.train_subnetworks_only] every parameter of the frozen
module (the pretrained transformer) stops requiring gradients, and each projection weight that the
languages' units own gets one small trainable tensor, ``subnetwork_values``: the owned rows (or
columns) of the union of the languages' subnetworks, ``[k, in]`` (or ``[out, k]``), registered on
the projection beside its frozen ``weight``. Unstructured parameter masks of a projection weight
give ``[k]`` values at int32 flat indices instead.

The weight's owned entries always hold the values (a forward pre-hook copies the values into them
where they differ, e.g. after an optimizer step), so the projection computes what the dense
model computes, bit for bit, with ``V`` in place of ``W[I]``. A forward hook gives the values the
gradient the dense weight's owned entries would get (``dy[..., I]^T x`` for rows, ``dy^T
x[..., I]`` for columns: the gradient of the exactly zero term ``x (V - W[I])^T``, without
computing the term). No gradient is allocated for a frozen weight (flat values excepted: theirs
is gathered from a transient dense one), and the optimizer holds state for ``V`` alone: 16 bytes
per trainable parameter with fp32 AdamW (value, gradient, two moments). In a half-precision model
(bf16 or fp16 weights: the frozen base in lower precision) the values are an fp32 master copy
with fp32 gradients and moments: the forward and backward run with the weight's rounded copy of
them, the update is taken in fp32, and the frozen entries never change.

The model's ``state_dict`` is the plain dense model (the values are not in it), so checkpoints,
exports and ``save_pretrained`` see an ordinary model, and loading a state dict refreshes the
values from the loaded weight. After writing weights otherwise, call
[refresh][subnets.masks.compact.SubnetworkParameters.refresh], or the next forward writes the older
values back. (A half-precision model's checkpoint thus holds the values rounded to its dtype.)

Shared parameters (embeddings, norms, biases, and projection coordinates no unit of any language
owns) are frozen; biases count as shared even where a unit owns their entries, as in LoRA. A
step of language ``l`` updates only ``l``'s coordinates of the values
([update_mask][subnets.masks.compact.SubnetworkParameters.update_mask], for
[MaskedOptimizer][subnets.optim.MaskedOptimizer]).

Re-selection ([reselect][subnets.masks.compact.SubnetworkParameters.reselect]) keeps the values and
moments of rows still selected, leaves dropped rows merged in the weight, and starts new rows at the
weight's value (a zero delta) with zero moments; a tensor's step counter continues.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from subnets.masks.subnetwork import Subnetwork
from subnets.models.ownership import Owned

VALUES, INDEX = "subnetwork_values", "subnetwork_index"


@dataclass
class _Projection:
    """One trained projection weight: its module, name, the owned records of its weight, and
    the weight dimension its index runs along (None: flat indices of unstructured masks)."""

    name: str  # the module's name in the model
    module: nn.Module
    owned: list[Owned]
    dim: int | None  # the index's dimension; None: flat indices (unstructured masks)
    owned_dim: int | None  # the dimension units own (None: several)

    @property
    def values(self) -> nn.Parameter:
        return getattr(self.module, VALUES)

    @property
    def index(self) -> torch.Tensor:
        return getattr(self.module, INDEX)

    def kept(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """Entries along ``owned_dim`` that a unit kept in ``unit_mask`` owns."""
        weight = self.module.weight
        kept = torch.zeros(weight.shape[self.owned_dim], dtype=torch.bool, device=weight.device)
        for owned in self.owned:
            kept |= unit_mask[owned.layer].to(weight.device)[owned.owners.to(weight.device)].any(dim=1)
        return kept

    def weight_mask(self, subnetwork: Subnetwork) -> torch.Tensor:
        """The coordinates of the weight that ``subnetwork`` updates: its parameter mask of the
        weight where it has one (it stands in for the units), else what its units own."""
        weight = self.module.weight
        given = subnetwork.param_masks.get(f"{self.name}.weight")
        if given is not None:
            return given.to(weight.device)
        if self.owned_dim is None:
            return torch.zeros_like(weight, dtype=torch.bool)
        shape = [1] * weight.ndim
        shape[self.owned_dim] = -1
        return self.kept(subnetwork.unit_mask).view(shape).expand_as(weight)


class _ValuesGradient(torch.autograd.Function):
    """The identity on a projection's output whose backward gives the subnetwork values the
    gradient that the dense weight's owned entries would get: ``dy[..., I]^T x`` for owned rows
    (output features), ``dy^T x[..., I]`` for owned columns (input features), the entries of
    ``dy^T x`` at flat indices. It is the gradient of the exactly zero term ``x (V - W[I])^T``
    (the weight holds the values), computed without the term; the term's gradient into ``x`` is
    zero and is not computed."""

    @staticmethod
    def forward(ctx, output, x, values, index, dim, conv1d):
        ctx.save_for_backward(x, index)
        ctx.dim, ctx.conv1d, ctx.dtype = dim, conv1d, values.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        x, index = ctx.saved_tensors
        dy, x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype)
        if ctx.dim is None:  # flat indices: the dense gradient's entries
            dense = x.t() @ dy if ctx.conv1d else dy.t() @ x
            values = dense.reshape(-1)[index]
        elif ctx.dim == (1 if ctx.conv1d else 0):  # output features
            values = dy.index_select(1, index).t() @ x  # [k, in]
            values = values.t() if ctx.conv1d else values
        else:  # input features
            values = dy.t() @ x.index_select(1, index)  # [out, k]
            values = values.t() if ctx.conv1d else values
        return grad, None, values.to(ctx.dtype), None, None, None


class _Forward:
    """Forward hook of a projection with subnetwork values: its output, carrying the values'
    gradient ([_ValuesGradient][subnets.masks.compact._ValuesGradient]) when gradients are on.
    Stateless, so that a deep copy of the model keeps working."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        values = getattr(module, VALUES)
        if not (torch.is_grad_enabled() and values.requires_grad):
            return output
        conv1d = type(module).__name__ == "Conv1D"  # GPT-2's transposed [in, out] weight
        index = getattr(module, INDEX).long()
        return _ValuesGradient.apply(output, args[0], values, index, module.subnetwork_dim, conv1d)


def _sync(module: nn.Module, *args) -> None:
    """Copy the values into the weight's owned entries where they differ (a forward pre-hook:
    before the weight is used; compared rather than tracked, since optimizers may write the values
    through ``.data``, and an unchanged weight is not written, so that a graph holding it stays valid)."""
    values, index, weight = getattr(module, VALUES), getattr(module, INDEX).long(), module.weight
    with torch.no_grad():
        current = _owned(weight, index, module.subnetwork_dim)
        if torch.equal(current, values.to(weight.dtype)):
            return
        if module.subnetwork_dim is None:
            weight.view(-1)[index] = values.to(weight.dtype)
        else:
            weight.index_copy_(module.subnetwork_dim, index, values.to(weight.dtype))


def _owned(weight: torch.Tensor, index: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The weight's entries at ``index`` along ``dim`` (None: flat)."""
    return weight.reshape(-1)[index] if dim is None else weight.index_select(dim, index)


def _drop_values(module: nn.Module, state: dict, prefix: str, metadata) -> None:
    """The state dict holds the dense weight (synced: it holds the weight's storage) and not the values."""
    _sync(module)
    state.pop(prefix + VALUES, None)


def _refresh_values(module: nn.Module, incompatible) -> None:
    """After loading a state dict (which holds no values): take the values from the loaded weight."""
    for key in [k for k in getattr(incompatible, "missing_keys", []) if k.endswith(VALUES)]:
        incompatible.missing_keys.remove(key)
    with torch.no_grad():
        values = getattr(module, VALUES)
        values.copy_(
            _owned(module.weight, getattr(module, INDEX).long(), module.subnetwork_dim).to(values.dtype)
        )


class SubnetworkParameters:
    """The trainable values of a model's subnetworks (module docstring); made by
    [train_subnetworks_only][subnets.masks.compact.train_subnetworks_only]."""

    def __init__(self, model: nn.Module, projections: list[_Projection], frozen: nn.Module):
        self.model, self.projections, self.frozen = model, projections, frozen

    def parameters(self) -> list[nn.Parameter]:
        """The trainable values, one tensor per trained projection."""
        return [p.values for p in self.projections]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The values by their names in the model (``<projection>.subnetwork_values``)."""
        return [(f"{p.name}.{VALUES}", p.values) for p in self.projections]

    def numel(self) -> int:
        """How many parameters the subnetworks train (all languages together)."""
        return sum(p.values.numel() for p in self.projections)

    def update_mask(self, subnetwork: Subnetwork | None) -> dict[str, torch.Tensor] | None:
        """What a step through ``subnetwork`` may update, as boolean masks of the values by name
        (None: every value, without a subnetwork)."""
        if subnetwork is None:
            return None
        masks = {}
        for p in self.projections:
            if p.dim is None:
                mask = p.weight_mask(subnetwork).reshape(-1)[p.index.long()]
            else:
                mask = p.weight_mask(subnetwork).index_select(p.dim, p.index.long())
            masks[f"{p.name}.{VALUES}"] = mask.contiguous()
        return masks

    def reselect(
        self, subnetworks: Iterable[Subnetwork], optimizer: torch.optim.Optimizer | None = None
    ) -> bool:
        """Train the union of ``subnetworks`` from now on (module docstring: what happens to the
        values and moments of kept, dropped and new rows); returns whether anything changed."""
        union, param_masks = _union(list(subnetworks))
        changed = False
        for p in self.projections:
            if p.dim is None:
                continue  # unstructured masks are chosen once
            _sync(p.module)
            new = p.kept(union).nonzero().flatten()
            old = p.index.long()
            if torch.equal(new, old):
                continue
            changed = True
            previous = p.values
            values = nn.Parameter(
                p.module.weight.detach().index_select(p.dim, new).to(previous.dtype).clone()
            )
            setattr(p.module, INDEX, new.to(torch.int32))
            p.module.register_parameter(VALUES, values)
            if optimizer is not None:
                _move_state(optimizer, previous, values, old, new, p.dim)
        return changed

    def refresh(self) -> None:
        """Take the values from the weights: after writing the weights other than by
        ``load_state_dict`` (which refreshes them itself), or the next forward would write the
        older values back."""
        for p in self.projections:
            _refresh_values(p.module, None)

    def merge(self) -> None:
        """Put the values into the weights and remove them: the model is the plain dense model again."""
        for p in self.projections:
            _sync(p.module)
            for handle in p.module.subnetwork_handles:
                handle.remove()
            del p.module._parameters[VALUES], p.module._buffers[INDEX]
            del p.module.subnetwork_dim, p.module.subnetwork_handles
        self.projections = []
        if getattr(self.model, "subnetwork_parameters", None) is self:
            del self.model.subnetwork_parameters


def _union(subnetworks: list[Subnetwork]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    union = torch.stack([s.unit_mask for s in subnetworks]).any(dim=0)
    names = {n for s in subnetworks for n in s.param_masks}
    params = {
        n: torch.stack([s.param_masks[n] for s in subnetworks if n in s.param_masks]).any(dim=0)
        for n in names
    }
    return union, params


def _replace(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, new: nn.Parameter, name: str | None = None
) -> None:
    """Put ``new`` in ``old``'s place in ``optimizer``'s parameter groups (same position; a group's
    ``names`` too) and, as ``name``, in the names of a [MaskedOptimizer][subnets.optim.MaskedOptimizer]
    it is or wraps (wrappers share the groups)."""
    for group in optimizer.param_groups:
        for i, q in enumerate(group["params"]):
            if q is old:
                group["params"][i] = new
                if name is not None and "names" in group:
                    group["names"][i] = name
    inner = optimizer
    while inner is not None:
        names = getattr(inner, "names", None)
        if isinstance(names, dict):
            for key, value in list(names.items()):
                if value is old and key.endswith(VALUES):
                    names[key] = new
            if name is not None:
                names[name] = new
        inner = getattr(inner, "optimizer", None)


def _move_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, old_index: torch.Tensor,
                new_index: torch.Tensor, dim: int) -> None:  # fmt: skip
    """Put ``new`` in ``old``'s place in ``optimizer`` with the state of rows in both indices carried
    over, zero for new rows, and per-tensor state (a step counter) kept."""
    _replace(optimizer, old, new)
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    kept_new = torch.isin(new_index, old_index)
    kept_old = torch.searchsorted(old_index, new_index[kept_new])
    moved = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            fresh = torch.zeros_like(new)
            fresh.index_copy_(dim, kept_new.nonzero().flatten(), value.index_select(dim, kept_old))
            moved[key] = fresh
        else:
            moved[key] = value
    optimizer.state[new] = moved


def train_subnetworks_only(
    model: nn.Module,
    subnetworks: Iterable[Subnetwork],
    frozen: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    gates=None,
) -> SubnetworkParameters:
    """Train only the union of ``subnetworks`` in ``frozen`` (e.g. the pretrained transformer of
    ``model``), whose units ``gates`` (default ``model.gates``) define (module docstring).

    Parameters of ``model`` outside ``frozen`` (a task head) keep training. Where ``model``
    already trains its subnetworks alone, this re-selects them
    ([reselect][subnets.masks.compact.SubnetworkParameters.reselect]). An ``optimizer`` built
    before gets each trained weight replaced by its values in its parameter groups (same
    position, so its ``state_dict`` keeps its layout); build one after instead, over the
    parameters that require gradients.

    Raises:
        ValueError: an unstructured parameter mask on a tensor that is not a projection weight.
    """
    subnetworks = list(subnetworks)
    installed = getattr(model, "subnetwork_parameters", None)
    if installed is not None:
        installed.reselect(subnetworks, optimizer)
        return installed
    gates = gates or model.gates
    union, param_masks = _union(subnetworks)
    modules = {id(m.weight): (name, m) for name, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), nn.Parameter)}  # fmt: skip
    by_weight: dict[int, list[Owned]] = {}
    for owned in gates.owned:
        if id(owned.parameter) in modules:
            by_weight.setdefault(id(owned.parameter), []).append(owned)
    named = dict(model.named_parameters())
    unknown = [n for n in param_masks if id(named.get(n)) not in modules or not n.endswith(".weight")]
    if unknown:
        raise ValueError(f"training the subnetworks alone: parameter masks of {', '.join(unknown)}, which are not "
                         "projection weights (only a Linear or Conv1D weight can hold unstructured values)")  # fmt: skip
    replaced: dict[int, nn.Parameter] = {}
    projections = []
    for weight_id, owned in by_weight.items():
        name, module = modules[weight_id]
        weight = module.weight
        dims = {o.dim for o in owned}
        owned_dim = dims.pop() if len(dims) == 1 else None
        projection = _Projection(name, module, owned, owned_dim, owned_dim)
        if f"{name}.weight" in param_masks or owned_dim is None:
            projection.dim = None  # unstructured: flat indices of what any language updates
            coordinates = torch.stack([projection.weight_mask(s) for s in subnetworks]).any(dim=0)
            index = coordinates.reshape(-1).nonzero().flatten()
            values = weight.detach().reshape(-1)[index]
        else:
            index = projection.kept(union).nonzero().flatten()
            values = weight.detach().index_select(projection.dim, index)
        half = values.dtype in (torch.float16, torch.bfloat16)  # the values are the fp32 master copy
        parameter = nn.Parameter(values.float() if half else values.clone())
        module.register_parameter(VALUES, parameter)
        module.register_buffer(INDEX, index.to(torch.int32), persistent=False)
        module.subnetwork_dim = projection.dim
        module.subnetwork_handles = [module.register_forward_pre_hook(_sync), module.register_forward_hook(_Forward()),
                                     module.register_state_dict_post_hook(_drop_values),
                                     module.register_load_state_dict_post_hook(_refresh_values)]  # fmt: skip
        replaced[weight_id] = parameter
        projections.append(projection)
    for parameter in frozen.parameters():
        if not any(parameter is p.values for p in projections):
            parameter.requires_grad_(False)
    if optimizer is not None:
        for projection in projections:
            _replace(optimizer, projection.module.weight, projection.values, f"{projection.name}.{VALUES}")
    installed = SubnetworkParameters(model, projections, frozen)
    model.subnetwork_parameters = installed
    return installed


def subnetwork_parameters(model: nn.Module) -> SubnetworkParameters | None:
    """The [SubnetworkParameters][subnets.masks.compact.SubnetworkParameters] of a model that trains its
    subnetworks alone, or None."""
    return getattr(model, "subnetwork_parameters", None)


def trainable_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the trainable values, their gradients and the optimizer state of ``optimizer``'s
    parameters that require gradients (counted from the tensors' storages)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    state = [t for p in params for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"values": size(params), "gradients": size([p.grad for p in params if p.grad is not None]), "optimizer": size(state)}  # fmt: skip
