"""One language's subnetwork baked into a smaller transformer: the weights of the units it gates
off are removed ([prune_units][subnets.hf.prune.prune_units]), so the pruned model computes what the gated
model computes with fewer parameters.

* Feed-forward neurons: the rows of the feed-forward input projections (and their biases) and
  the columns of the output projection that belong to removed neurons; any layout.
* Attention heads: the rows of the query, key and value projections and the columns of the
  attention output projection; layouts with separate query, key and value projections and one
  key-value head per query head (BERT, XLM-R, ELECTRA, ...); a head count the module keeps as an
  attribute (``num_attention_heads``, ``all_head_size``, ``num_heads``) is updated. Fused or
  grouped-query attention is refused with a message (its head count cannot change per layer).

A standard Hugging Face config has one head count and one feed-forward width for every layer, so
a pruned model is saved with [save_pruned][subnets.hf.prune.save_pruned] (``save_pretrained`` plus the units
kept per layer) and loaded with [load_pruned][subnets.hf.prune.load_pruned]; ``AutoModel.from_pretrained``
does not load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from subnets.masks.selection import kind_columns
from subnets.models.gates import UnitGates

PRUNED_FILE = "subnets_pruned.json"
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_head", "n_heads")


@torch.no_grad()
def prune_units(model: nn.Module, gates: UnitGates, keep: torch.Tensor) -> dict[str, int]:
    """Remove from ``model`` (the transformer ``gates`` gate) the weights of every unit that
    ``keep`` (boolean ``[layers, units]``) leaves out. Returns the parameter count before and after.

    Raises:
        ValueError: heads of a fused or grouped-query attention layout, or a layer left with no
            unit of a kind.
    """
    keep = keep.to(torch.bool).cpu()
    if tuple(keep.shape) != gates.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}; the model's units are {gates.shape}")
    before = sum(p.numel() for p in model.parameters())
    columns = kind_columns(gates.units)
    for kind, block in columns.items():
        empty = [layer for layer in range(gates.num_layers) if not keep[layer, block].any()]
        if empty:
            raise ValueError(f"layer(s) {empty} would keep no {kind}: a pruned layer needs at least one")
    if any(len({id(m) for m in outputs}) < gates.num_layers for outputs in gates.outputs.values()):
        raise ValueError(f"the {gates.layout.family} layout shares its layers between depths: one layer cannot be "
                         "pruned to the units of several depths")  # fmt: skip
    if "heads" in gates.units:
        attention = gates.layout.attention
        if attention.qkv is not None or gates.kv_group > 1:
            raise ValueError(f"heads of the {gates.layout.family} layout cannot be pruned: its attention is "
                             f"{'fused (qkv)' if attention.qkv is not None else 'grouped-query'}; prune neurons "
                             "(units=neurons) or keep the masked model")  # fmt: skip
    modules = {
        id(m.weight): m for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
    }
    modules |= {id(m.bias): m for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    for owned in gates.owned:
        kept = keep[owned.layer][owned.owners].any(dim=1)
        index = torch.nonzero(kept).flatten().to(owned.parameter.device)
        parameter = owned.parameter
        parameter.data = parameter.data.index_select(owned.dim, index).contiguous()
        module = modules[id(parameter)]
        if isinstance(module, nn.Linear) and parameter is module.weight:
            module.out_features, module.in_features = module.weight.shape
    if "heads" in gates.units:
        layers = _attention_modules(model, gates)
        for layer, modules_of_layer in enumerate(layers):
            count = int(keep[layer, columns["heads"]].sum())
            for module in modules_of_layer:
                for name in HEAD_COUNT_ATTRIBUTES:
                    if isinstance(getattr(module, name, None), int):
                        setattr(module, name, count)
                if isinstance(getattr(module, "all_head_size", None), int):
                    module.all_head_size = count * gates.head_dim
    return {"before": before, "after": sum(p.numel() for p in model.parameters())}


def _attention_modules(model: nn.Module, gates: UnitGates) -> list[list[nn.Module]]:
    """Per depth, the modules between the layer and its query projection (where head counts live)."""
    from subnets.models.layouts import layer_list

    attention = gates.layout.attention
    found = []
    for layer in layer_list(model, attention.layers):
        modules, current = [], layer
        for part in attention.query.split(".")[:-1]:
            current = getattr(current, part)
            modules.append(current)
        found.append(modules)
    return found


def save_pruned(model: nn.Module, keep: torch.Tensor, units: dict[str, int], folder: str | os.PathLike,
                about: dict | None = None) -> Path:  # fmt: skip
    """Write a model pruned by [prune_units][subnets.hf.prune.prune_units] (``save_pretrained``) and the units
    it kept."""
    folder = Path(folder)
    model.save_pretrained(folder)
    record = {"units": units, "keep": keep.to(torch.int8).tolist(), **(about or {})}
    (folder / PRUNED_FILE).write_text(json.dumps(record) + "\n")
    return folder


def load_pruned(folder: str | os.PathLike) -> nn.Module:
    """A model written by [save_pruned][subnets.hf.prune.save_pruned]: built from its config, pruned to the
    recorded units, its weights loaded (strictly)."""
    from safetensors.torch import load_file

    from subnets.models.gates import UNIT_CHOICES

    folder = Path(folder)
    path = folder / PRUNED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no pruned model ({PRUNED_FILE} is missing)")
    record = json.loads(path.read_text())
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModel.from_config(config)
    units = next(name for name, kinds in UNIT_CHOICES.items() if list(kinds) == list(record["units"]))
    gates = UnitGates(model, units, check=False)
    keep = torch.tensor(record["keep"], dtype=torch.bool)
    prune_units(model, gates, keep)
    gates.remove()
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a part the saved model was built without (e.g. BertModel's pooler, add_pooling_layer=False)
    absent = {key.split(".")[0] for key in missing}
    partial = [name for name in absent if any(k.startswith(name + ".") for k in state)]
    if unexpected or partial:
        raise ValueError(f"{folder}: the weights do not fit the pruned model (unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if k.split('.')[0] in partial][:3]})")  # fmt: skip
    for name in absent:
        setattr(model, name, None)
    return model.eval()
