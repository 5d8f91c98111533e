"""Language-specific subnetworks: per-language unit masks (and optional parameter masks).

A [Subnetwork][subnets.masks.subnetwork.Subnetwork] is one language's mask: ``unit_mask[layer, unit]`` is True
where the unit (an attention head, or a feed-forward neuron) belongs to the language, and
``param_masks[name]`` (optional) marks the coordinates of other parameter tensors it owns. A
[SubnetworkSet][subnets.masks.subnetwork.SubnetworkSet] holds the subnetworks of several languages for one
model, whose identity (layers, units of each kind, masked parameter shapes) travels with the saved file, so
masks cannot be applied to another model by mistake.

What a unit owns in the parameters is given by the model's layout
([subnets.models.layouts][]): e.g. head ``h`` of layer ``i`` of a BERT owns rows
``h*d:(h+1)*d`` of that layer's query, key and value weights and biases and columns
``h*d:(h+1)*d`` of its attention output projection
([unit_parameter_masks][subnets.masks.subnetwork.unit_parameter_masks]).

Example::

    masks = SubnetworkSet.for_model(model)            # model: a module with .gates (e.g. a DependencyParser)
    masks["en"] = Subnetwork(unit_mask)               # [layers, heads] bool
    masks.save("masks.safetensors")
    masks = SubnetworkSet.load("masks.safetensors", expect=model)
    languages, overlap = masks.jaccard()
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from subnets.files import load_safetensors, save_safetensors
from subnets.masks.selection import Units, kind_columns
from subnets.models.gates import UnitGates


class MaskMismatchError(ValueError):
    """Masks made for one model applied to another."""


@dataclass
class Subnetwork:
    """One language's subnetwork: a boolean unit mask ``[layers, units]``, optional boolean
    parameter masks by parameter name, and optionally the unit scores it was selected from."""

    unit_mask: torch.Tensor
    param_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # the unit importance it was selected from, if known

    def __post_init__(self):
        self.unit_mask = self.unit_mask.detach().to(torch.bool).cpu()
        self.param_masks = {k: v.detach().to(torch.bool).cpu() for k, v in self.param_masks.items()}
        if self.scores is not None:
            self.scores = self.scores.detach().float().cpu()

    @property
    def num_units_kept(self) -> int:
        return int(self.unit_mask.sum())

    def layer_sparsity(self) -> list[float]:
        """Fraction of units removed in each layer."""
        return (1.0 - self.unit_mask.float().mean(dim=1)).tolist()

    def sparsity(self) -> float:
        """Fraction of all units removed."""
        return 1.0 - float(self.unit_mask.float().mean())

    def param_sparsity(self) -> float | None:
        """Fraction of masked parameter coordinates removed (None without parameter masks)."""
        if not self.param_masks:
            return None
        total = sum(m.numel() for m in self.param_masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.param_masks.values()) / total


class SubnetworkSet(Mapping):
    """The subnetworks of several languages for one model.

    Args:
        num_layers: the model's depth.
        units: units per layer by kind, in column order (``{"heads": 12}``, ``{"neurons": 1536}``
            or both); a number means that many heads.
        param_shapes: shapes of the parameters that parameter masks may cover.
    """

    def __init__(
        self, num_layers: int, units: Units | int, param_shapes: Mapping[str, tuple[int, ...]] | None = None
    ):
        self.num_layers = int(num_layers)
        self.units = (
            {"heads": int(units)} if isinstance(units, int) else {k: int(v) for k, v in units.items()}
        )
        self.param_shapes = {k: tuple(v) for k, v in (param_shapes or {}).items()}
        self._masks: dict[str, Subnetwork] = {}

    @property
    def num_units(self) -> int:
        """Units per layer, all kinds together."""
        return sum(self.units.values())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_units)

    @classmethod
    def for_model(cls, model: nn.Module) -> SubnetworkSet:
        """An empty set for ``model`` (a module with ``.gates``, e.g. a DependencyParser)."""
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        return cls(model.gates.num_layers, model.gates.units, shapes)

    # Mapping interface ------------------------------------------------------------
    def __getitem__(self, language: str) -> Subnetwork:
        return self._masks[language]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __setitem__(self, language: str, subnetwork: Subnetwork) -> None:
        shape = tuple(subnetwork.unit_mask.shape)
        if shape != self.shape:
            raise MaskMismatchError(
                f"{language}: unit mask of shape {shape} for a model with (layers, units) = {self.shape} "
                f"({self.describe()})"
            )
        for name, mask in subnetwork.param_masks.items():
            expected = self.param_shapes.get(name)
            if expected is None:
                raise MaskMismatchError(
                    f"{language}: parameter mask for {name!r}, which the model does not have"
                )
            if tuple(mask.shape) != expected:
                raise MaskMismatchError(
                    f"{language}: parameter mask {name!r} has shape {tuple(mask.shape)}, the model's is {expected}"
                )
        self._masks[language] = subnetwork

    # Saving ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A nested dictionary of tensors and numbers (for checkpoints)."""
        return {
            "num_layers": self.num_layers,
            "units": dict(self.units),
            "masks": {
                lang: {"heads": s.unit_mask, "params": dict(s.param_masks), "scores": s.scores}
                for lang, s in self._masks.items()
            },
        }

    @classmethod
    def from_state_dict(
        cls, state: dict, param_shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> SubnetworkSet:
        if param_shapes is None:  # the masks' own shapes
            param_shapes = {
                n: tuple(m.shape) for entry in state["masks"].values() for n, m in entry["params"].items()
            }
        masks = cls(state["num_layers"], state.get("units", state.get("num_heads")), param_shapes)
        for language, entry in state["masks"].items():
            masks[language] = Subnetwork(entry["heads"], entry["params"], entry.get("scores"))
        return masks

    def save(self, path: str | os.PathLike) -> Path:
        """Write all masks and the model identity (layers, units of each kind, the masked
        parameters' shapes) to one safetensors file (atomically)."""
        tensors = {}
        for language, subnetwork in self._masks.items():
            tensors[f"{language}/heads"] = subnetwork.unit_mask.to(torch.uint8).contiguous()
            if subnetwork.scores is not None:
                tensors[f"{language}/scores"] = subnetwork.scores.contiguous()
            for name, mask in subnetwork.param_masks.items():
                tensors[f"{language}/params/{name}"] = mask.to(torch.uint8).contiguous()
        used = {n for s in self._masks.values() for n in s.param_masks}
        header = {
            "format": "subnets-masks-1",
            "num_layers": self.num_layers,
            "units": self.units,
            "languages": list(self._masks),
            "param_shapes": {k: v for k, v in self.param_shapes.items() if k in used},
        }
        return save_safetensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: nn.Module | SubnetworkSet | None = None) -> SubnetworkSet:
        """Read masks saved by [save][subnets.masks.subnetwork.SubnetworkSet.save]; with ``expect`` (a model
        or a set), check that they were made for a model of the same geometry.

        Raises:
            MaskMismatchError: the masks were made for another model (the message names both shapes).
        """
        tensors, meta = load_safetensors(path, what="subnets mask file")
        if meta.get("format") != "subnets-masks-1":
            raise ValueError(f"{path} is not a subnets mask file (format {meta.get('format')!r})")
        # files of the earlier format hold every header value as a JSON string
        meta = {k: json.loads(v) if isinstance(v, str) and k != "format" else v for k, v in meta.items()}
        # files written before neuron units hold num_heads
        masks = cls(
            int(meta["num_layers"]), meta.get("units") or int(meta["num_heads"]), meta["param_shapes"]
        )
        if expect is not None:
            reference = expect if isinstance(expect, SubnetworkSet) else cls.for_model(expect)
            masks.check_compatible(reference, str(path))
            masks.param_shapes = {**reference.param_shapes, **masks.param_shapes}
        for language in meta["languages"]:
            prefix = f"{language}/params/"
            params = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            masks[language] = Subnetwork(
                tensors[f"{language}/heads"], params, tensors.get(f"{language}/scores")
            )
        return masks

    def check_compatible(self, other: SubnetworkSet, source: str = "masks") -> None:
        """Raise [MaskMismatchError][subnets.masks.subnetwork.MaskMismatchError] unless ``other`` describes
        the same model geometry."""
        if (self.num_layers, self.units) != (other.num_layers, other.units):
            raise MaskMismatchError(
                f"{source} were made for a model with {self.describe()}, but this model has {other.describe()}"
            )
        for name, shape in self.param_shapes.items():
            if name in other.param_shapes and other.param_shapes[name] != shape:
                raise MaskMismatchError(
                    f"{source}: parameter {name!r} had shape {shape}, but this model's has shape {other.param_shapes[name]}"
                )
            if name not in other.param_shapes and other.param_shapes:
                raise MaskMismatchError(
                    f"{source}: parameter {name!r} (shape {shape}) does not exist in this model"
                )

    def describe(self) -> str:
        """The geometry in words, e.g. ``(layers, heads) = (12, 12)``."""
        kinds = ", ".join(self.units)
        return f"(layers, {kinds}) = {(self.num_layers, *self.units.values())}"

    def kind(self, kind: str) -> SubnetworkSet:
        """The same languages' masks restricted to one kind of unit (no parameter masks)."""
        columns = kind_columns(self.units)[kind]
        restricted = SubnetworkSet(self.num_layers, {kind: self.units[kind]})
        for language, s in self._masks.items():
            scores = None if s.scores is None else s.scores[:, columns]
            restricted[language] = Subnetwork(s.unit_mask[:, columns], scores=scores)
        return restricted

    # Summaries ---------------------------------------------------------------------
    def sparsity(self) -> dict[str, dict]:
        """Per language: units kept, overall and per-layer fraction of units removed."""
        return {
            language: {
                "units_kept": s.num_units_kept,
                "sparsity": s.sparsity(),
                "layer_sparsity": s.layer_sparsity(),
                **({"param_sparsity": s.param_sparsity()} if s.param_masks else {}),
            }
            for language, s in self._masks.items()
        }

    def jaccard(self) -> tuple[list[str], np.ndarray]:
        """Languages and the matrix of Jaccard overlaps |A & B| / |A | B| of their unit masks."""
        languages = list(self._masks)
        flat = torch.stack([self._masks[lang].unit_mask.flatten() for lang in languages]).float()
        intersection = flat @ flat.T
        sizes = flat.sum(dim=1)
        union = sizes[:, None] + sizes[None, :] - intersection
        overlap = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        return languages, overlap.numpy()

    def overlap_figure(self, title: str | None = None):
        """A matplotlib heatmap of [jaccard][subnets.masks.subnetwork.SubnetworkSet.jaccard]."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        languages, overlap = self.jaccard()
        title = title or f"{' and '.join(self.units).capitalize()}: mask overlap (Jaccard)"
        size = 1.2 + 0.55 * len(languages)
        figure, axis = plt.subplots(figsize=(size + 1.2, size))
        image = axis.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
        axis.set_xticks(range(len(languages)), languages, rotation=45, ha="right")
        axis.set_yticks(range(len(languages)), languages)
        for i in range(len(languages)):
            for j in range(len(languages)):
                color = "white" if overlap[i, j] < 0.6 else "black"
                axis.text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
        axis.set_title(title)
        figure.colorbar(image, ax=axis, fraction=0.046)
        figure.tight_layout()
        return figure


def unit_parameter_masks(
    model: nn.Module, mask: torch.Tensor, gates: UnitGates | None = None
) -> dict[str, torch.Tensor]:
    """Parameter masks equivalent to the unit ``mask`` (``[layers, units]``; True: kept), by
    the parameter names of ``model`` (whose ``.gates`` are ``gates`` by default).

    A coordinate is True when any unit that owns it is kept ([subnets.models.layouts][]: a
    key-value head shared by a group of query heads, a weight shared by several depths);
    parameters no unit owns are not in the result, i.e. shared.
    """
    gates = gates or model.gates
    names = {id(p): n for n, p in model.named_parameters()}
    mask = mask.to(torch.bool)
    masks: dict[str, torch.Tensor] = {}
    for owned in gates.owned:
        parameter = owned.parameter
        kept = mask[owned.layer].to(parameter.device)[owned.owners.to(parameter.device)].any(dim=1)
        shape = [1] * parameter.ndim
        shape[owned.dim] = -1
        kept = kept.view(shape).expand_as(parameter)
        name = names[id(parameter)]
        masks[name] = masks[name] | kept if name in masks else kept.clone()
    return masks
