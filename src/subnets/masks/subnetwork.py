"""Language-specific subnetworks: per-language head masks (and optional parameter masks).

A :class:`Subnetwork` is one language's mask: ``head_mask[layer, head]`` is True where the head
belongs to the language, and ``param_masks[name]`` (optional) marks the coordinates of other
parameter tensors it owns. A :class:`SubnetworkSet` holds the subnetworks of several languages
for one model, whose identity (layers, heads, masked parameter shapes) travels with the saved
file, so masks cannot be applied to another model by mistake.

Head ``h`` of layer ``i`` owns rows ``h*d:(h+1)*d`` of that layer's query, key and value weights
and biases and columns ``h*d:(h+1)*d`` of its attention output projection
(:func:`head_parameter_masks`).

Example::

    masks = SubnetworkSet.for_model(model)            # model: DependencyParser or HeadGates owner
    masks["en"] = Subnetwork(head_mask)               # [layers, heads] bool
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
from subnets.models.head_gates import HeadGates


class MaskMismatchError(ValueError):
    """Masks made for one model applied to another."""


@dataclass
class Subnetwork:
    """One language's subnetwork: a boolean head mask ``[layers, heads]``, optional boolean
    parameter masks by parameter name, and optionally the head scores it was selected from."""

    head_mask: torch.Tensor
    param_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # the head importance it was selected from, if known

    def __post_init__(self):
        self.head_mask = self.head_mask.detach().to(torch.bool).cpu()
        self.param_masks = {k: v.detach().to(torch.bool).cpu() for k, v in self.param_masks.items()}
        if self.scores is not None:
            self.scores = self.scores.detach().float().cpu()

    @property
    def num_heads_kept(self) -> int:
        return int(self.head_mask.sum())

    def layer_sparsity(self) -> list[float]:
        """Fraction of heads removed in each layer."""
        return (1.0 - self.head_mask.float().mean(dim=1)).tolist()

    def sparsity(self) -> float:
        """Fraction of all heads removed."""
        return 1.0 - float(self.head_mask.float().mean())

    def param_sparsity(self) -> float | None:
        """Fraction of masked parameter coordinates removed (None without parameter masks)."""
        if not self.param_masks:
            return None
        total = sum(m.numel() for m in self.param_masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.param_masks.values()) / total


class SubnetworkSet(Mapping):
    """The subnetworks of several languages for one model.

    Args:
        num_layers, num_heads: the model's attention geometry.
        param_shapes: shapes of the parameters that parameter masks may cover.
    """

    def __init__(
        self, num_layers: int, num_heads: int, param_shapes: Mapping[str, tuple[int, ...]] | None = None
    ):
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.param_shapes = {k: tuple(v) for k, v in (param_shapes or {}).items()}
        self._masks: dict[str, Subnetwork] = {}

    @classmethod
    def for_model(cls, model: nn.Module) -> SubnetworkSet:
        """An empty set for ``model`` (a module with ``.gates``, e.g. a DependencyParser)."""
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        return cls(model.gates.num_layers, model.gates.num_heads, shapes)

    # Mapping interface ------------------------------------------------------------
    def __getitem__(self, language: str) -> Subnetwork:
        return self._masks[language]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __setitem__(self, language: str, subnetwork: Subnetwork) -> None:
        shape = tuple(subnetwork.head_mask.shape)
        if shape != (self.num_layers, self.num_heads):
            raise MaskMismatchError(
                f"{language}: head mask of shape {shape} for a model with (layers, heads) = "
                f"{(self.num_layers, self.num_heads)}"
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
            "num_heads": self.num_heads,
            "masks": {
                lang: {"heads": s.head_mask, "params": dict(s.param_masks), "scores": s.scores}
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
        masks = cls(state["num_layers"], state["num_heads"], param_shapes)
        for language, entry in state["masks"].items():
            masks[language] = Subnetwork(entry["heads"], entry["params"], entry.get("scores"))
        return masks

    def save(self, path: str | os.PathLike) -> Path:
        """Write all masks and the model identity to one safetensors file (atomically)."""
        tensors = {}
        for language, subnetwork in self._masks.items():
            tensors[f"{language}/heads"] = subnetwork.head_mask.to(torch.uint8).contiguous()
            if subnetwork.scores is not None:
                tensors[f"{language}/scores"] = subnetwork.scores.contiguous()
            for name, mask in subnetwork.param_masks.items():
                tensors[f"{language}/params/{name}"] = mask.to(torch.uint8).contiguous()
        used = {n for s in self._masks.values() for n in s.param_masks}
        header = {
            "format": "subnets-masks-1",
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "languages": list(self._masks),
            "param_shapes": {k: v for k, v in self.param_shapes.items() if k in used},
        }
        return save_safetensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: nn.Module | SubnetworkSet | None = None) -> SubnetworkSet:
        """Read masks saved by :meth:`save`; with ``expect`` (a model or a set), check that they
        were made for a model of the same geometry.

        Raises:
            MaskMismatchError: the masks were made for another model (the message names both shapes).
        """
        tensors, meta = load_safetensors(path, what="subnets mask file")
        if meta.get("format") != "subnets-masks-1":
            raise ValueError(f"{path} is not a subnets mask file (format {meta.get('format')!r})")
        # files of the earlier format hold every header value as a JSON string
        meta = {k: json.loads(v) if isinstance(v, str) and k != "format" else v for k, v in meta.items()}
        masks = cls(int(meta["num_layers"]), int(meta["num_heads"]), meta["param_shapes"])
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
        """Raise :class:`MaskMismatchError` unless ``other`` describes the same model geometry."""
        mine, theirs = (self.num_layers, self.num_heads), (other.num_layers, other.num_heads)
        if mine != theirs:
            raise MaskMismatchError(
                f"{source} were made for a model with (layers, heads) = {mine}, "
                f"but this model has (layers, heads) = {theirs}"
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

    # Summaries ---------------------------------------------------------------------
    def sparsity(self) -> dict[str, dict]:
        """Per language: heads kept, overall and per-layer fraction of heads removed."""
        return {
            language: {
                "heads_kept": s.num_heads_kept,
                "sparsity": s.sparsity(),
                "layer_sparsity": s.layer_sparsity(),
                **({"param_sparsity": s.param_sparsity()} if s.param_masks else {}),
            }
            for language, s in self._masks.items()
        }

    def jaccard(self) -> tuple[list[str], np.ndarray]:
        """Languages and the matrix of Jaccard overlaps |A & B| / |A | B| of their head masks."""
        languages = list(self._masks)
        flat = torch.stack([self._masks[lang].head_mask.flatten() for lang in languages]).float()
        intersection = flat @ flat.T
        sizes = flat.sum(dim=1)
        union = sizes[:, None] + sizes[None, :] - intersection
        overlap = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        return languages, overlap.numpy()

    def overlap_figure(self, title: str = "Head-mask overlap (Jaccard)"):
        """A matplotlib heatmap of :meth:`jaccard`."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        languages, overlap = self.jaccard()
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


def head_parameter_masks(
    model: nn.Module, head_mask: torch.Tensor, gates: HeadGates | None = None
) -> dict[str, torch.Tensor]:
    """Parameter masks equivalent to ``head_mask`` (True: owned by a kept head).

    Covers the query, key and value weights and biases (rows) and the output projection weight
    (columns) of every layer; parameters no head owns (output bias, feed-forward, LayerNorm,
    embeddings, task heads) are not in the result, i.e. shared.
    """
    gates = gates or model.gates
    names = {id(p): n for n, p in model.named_parameters()}
    head_mask = head_mask.to(torch.bool)
    d = gates.head_dim
    masks = {}
    for layer, modules in enumerate(gates.layers):
        rows = head_mask[layer].repeat_interleave(d)
        for role in ("query", "key", "value"):
            linear = modules[role]
            device = linear.weight.device
            masks[names[id(linear.weight)]] = rows.to(device)[:, None].expand_as(linear.weight).clone()
            if linear.bias is not None:
                masks[names[id(linear.bias)]] = rows.to(device).clone()
        output = modules["output"].weight
        masks[names[id(output)]] = rows.to(output.device)[None, :].expand_as(output).clone()
    return masks
