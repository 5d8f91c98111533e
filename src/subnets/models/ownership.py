"""What each unit owns in a model's parameters, from its layout ([subnets.models.layouts][],
whose docstring states the rules): the coordinates a unit's masked update freezes and its Fisher
information sums over."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subnets.models.layouts import (
    AttentionLayout,
    ModelLayout,
    UnknownLayoutError,
    attention_paths,
    features,
    layer_projections,
)


def num_layers(model: nn.Module, physical: int) -> int:
    """The model's depth: ``config.num_hidden_layers`` when it has it, else the physical layers."""
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", physical) or physical)


@dataclass
class Owned:
    """Coordinates of ``parameter`` that units of depth ``layer`` own: entry ``i`` along ``dim``
    belongs to the units ``owners[i, :]`` (indices among the layer's units of one kind)."""

    layer: int
    parameter: nn.Parameter
    dim: int
    owners: torch.Tensor  # long, [size along dim, owners per entry]


@dataclass
class Units:
    """One kind of unit of a model: ``count`` per layer at ``len(outputs)`` depths.

    ``outputs[i]`` is the projection whose input (``[..., count * width]``) is gated at depth
    ``i``; ``owned`` lists what the units own ([Owned][subnets.models.ownership.Owned])."""

    kind: str
    count: int
    width: int
    outputs: list[nn.Module]
    owned: list[Owned]


def _own(layer: int, projection: nn.Module, rows: bool, owners: torch.Tensor) -> list[Owned]:
    """What ``owners`` own of ``projection``: its output features (``rows``: weight rows and the
    bias) or its input features (weight columns); a Conv1D's weight is transposed."""
    dim = int(rows) if type(projection).__name__ == "Conv1D" else int(not rows)
    entries = [Owned(layer, projection.weight, dim, owners)]
    if rows and projection.bias is not None:
        entries.append(Owned(layer, projection.bias, 0, owners))
    return entries


def head_units(model: nn.Module, layout: ModelLayout) -> Units:
    """The attention heads of ``model`` under ``layout`` (module docstring: what a head owns)."""
    attention = layout.attention
    physical = layer_projections(model, attention.layers, attention_paths(attention))
    config = getattr(model, "config", None)
    heads = int(attention.num_heads or config.num_attention_heads)
    kv_heads = int(attention.num_kv_heads or getattr(config, "num_key_value_heads", None)
                   or _falcon_kv_heads(config) or heads)  # fmt: skip
    output_width = features(physical[0][0])[0]
    if output_width % heads or heads % kv_heads:
        raise ValueError(f"{type(model).__name__}: the attention output projection's {output_width} inputs are not "
                         f"{heads} heads of equal size, or {kv_heads} key-value heads do not divide them")  # fmt: skip
    d = output_width // heads
    query_rows = torch.arange(heads * d)[:, None] // d  # [H*d, 1]
    group = heads // kv_heads
    kv_rows = (torch.arange(kv_heads * d) // d)[:, None] * group + torch.arange(group)  # [H_kv*d, group]
    depth = num_layers(model, len(physical))
    outputs, owned = [], []
    for i in range(depth):
        row = physical[i * len(physical) // depth]
        output, projections = row[0], row[1:]
        outputs.append(output)
        owned += _own(i, output, False, query_rows)
        if attention.qkv is None:
            for role, linear in zip(("query", "key", "value"), projections):
                owned += _own(i, linear, True, query_rows if role == "query" else kv_rows)
        else:
            fused = projections[0]
            rows = _fused_rows(attention, query_rows, kv_rows, kv_heads, group * d, d)
            if features(fused)[1] != len(rows):
                raise ValueError(f"{attention.qkv}: {features(fused)[1]} rows, expected {heads} query and 2 x "
                                 f"{kv_heads} key-value heads of size {d}")  # fmt: skip
            owned += _own(i, fused, True, rows)
    return Units("heads", heads, d, outputs, owned)


def _fused_rows(attention: AttentionLayout, query_rows: torch.Tensor, kv_rows: torch.Tensor, kv_heads: int,
                group_rows: int, d: int) -> torch.Tensor:  # fmt: skip
    """The owners of a fused projection's rows, in its ``qkv_layout`` and ``qkv_order``."""
    # one owners width for every row: a query row's one owner repeated as often as a key-value row has owners
    block = {"query": query_rows.expand(-1, kv_rows.shape[1]), "key": kv_rows, "value": kv_rows}
    if attention.qkv_layout == "blocked":
        return torch.cat([block[role] for role in attention.qkv_order])
    if attention.qkv_layout != "interleaved":
        raise ValueError(f"qkv_layout={attention.qkv_layout!r}: expected blocked or interleaved")
    size = {"query": group_rows, "key": d, "value": d}
    parts = []
    for g in range(kv_heads):  # per key-value head: its group's query heads, its key head, its value head
        for role in attention.qkv_order:
            start = g * size[role]
            parts.append(block[role][start : start + size[role]])
    return torch.cat(parts)


def _falcon_kv_heads(config) -> int | None:
    """Falcon's new decoder architecture names its key-value heads ``num_kv_heads``."""
    if getattr(config, "new_decoder_architecture", False):
        return getattr(config, "num_kv_heads", None)
    return None


def neuron_units(model: nn.Module, layout: ModelLayout) -> Units:
    """The feed-forward neurons of ``model`` under ``layout`` (module docstring: what a neuron owns)."""
    ff = layout.feed_forward
    if ff is None:
        raise UnknownLayoutError(
            "the layout declares no feed-forward block (feed_forward), so it has no neurons"
        )
    physical = layer_projections(model, ff.layers, [*ff.inputs, ff.output])
    intermediate = features(physical[0][-1])[0]
    rows = torch.arange(intermediate)[:, None]
    depth = num_layers(model, len(physical))
    outputs, owned = [], []
    for i in range(depth):
        row = physical[i * len(physical) // depth]
        *inputs, output = row
        outputs.append(output)
        owned += _own(i, output, False, rows)
        for linear in inputs:
            if features(linear)[1] != ff.fused_inputs * intermediate:
                raise ValueError(f"{type(model).__name__}: a feed-forward input projection has {features(linear)[1]} "
                                 f"rows, expected {ff.fused_inputs} x {intermediate} (feed_forward.fused_inputs)")  # fmt: skip
            owned += _own(i, linear, True, rows.repeat(ff.fused_inputs, 1))
    return Units("neurons", intermediate, 1, outputs, owned)


UNIT_KINDS = {"heads": head_units, "neurons": neuron_units}
