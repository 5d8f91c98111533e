"""Each language's subnetwork as a peft LoRA adapter: the exact difference between a model trained
through its subnetworks and the pretrained model it started from, for anyone who serves adapters
(peft, vLLM, TGI) rather than this package's gates.

A model trained with [train_subnetworks_only][subnets.masks.compact.train_subnetworks_only] is a
plain dense model whose only changed transformer coordinates are rows or columns that units own
([subnets.models.ownership][]): a head's rows of the query, key and value weights and its columns
of the attention output projection, a neuron's rows of the feed-forward input projections and its
column of the output projection. A change of ``k`` rows of a projection ``W [out, in]`` is
``ΔW = S D`` (``S [out, k]``: one-hot columns selecting the rows, ``D [k, in]``: their change), a
LoRA of rank ``k`` with ``lora_B = S`` and ``lora_A = D``; a change of ``k`` columns is
``ΔW = D Sᵀ`` (``lora_B = D [out, k]``, ``lora_A = Sᵀ``). Gating a unit off multiplies its slice
of the output projection's input by 0 ([UnitGates][subnets.models.gates.UnitGates]), which is the
same as removing its columns of that projection: ``ΔW[:, c] = -W_base[:, c]``. More generally a
gate ``g`` on a column gives ``ΔW[:, c] = g W_trained[:, c] - W_base[:, c]``, so where a column
both changed and is gated off, the removal wins.

A language's adapter ([lora_adapter][subnets.masks.lora.lora_adapter]) holds, per projection, the
rows or columns (the dimension its units own) where the trained weight differs from the base
weight, and, when the language's forward gates are used (``apply`` = ``forward`` or ``both``:
[gate_values][subnets.masks.core.gate_values]), the output-projection columns its gates turn off.
Under ``apply=gradient`` every language computed with the whole trained model, so every language
gets the same adapter. Every module's ``lora_alpha`` equals its rank (scaling 1), with
``rank_pattern`` and ``alpha_pattern`` by exact module name; ``lora_dropout=0``, ``bias="none"``.

The rank a language's export needs is the sum over its modules of the changed rows or columns
plus the gated-off output-projection columns that did not change (a column that changed and is
gated off counts once): e.g. a BERT layer where one head of 4 (width ``d``) was trained and the
other three are gated off needs ``d`` rows in each of the query, key and value projections and
``4d`` columns of the attention output projection (the trained head's ``d``, the others' ``3d``).

Parameters outside the transformer (a task head, e.g. ``classifier`` of a token classifier) that
differ from the base go to peft's ``modules_to_save``: stored whole in the adapter, exact. A
change anywhere else in the transformer (a bias, a norm, an embedding, a weight no unit owns)
cannot be a LoRA of this kind, and is refused with a ValueError naming the tensors: the model
trained shared parameters. The adapters load with ``PeftModel.from_pretrained(base, folder /
language)`` and serve mixed-language batches through peft's ``adapter_names`` (tested on BERT
and on a Qwen2 decoder with grouped-query attention: equal outputs, 1e-10 in float64).

Example::

    parameters = train_subnetworks_only(model, masks.values(), model.base_model)
    ...                                            # train, then
    ranks = save_lora_adapters(model, pretrained, masks, model.gates, "both", "adapters")
    served = PeftModel.from_pretrained(pretrained, "adapters/de", adapter_name="de")
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from subnets.files import atomic_write, atomic_write_json, atomic_write_text
from subnets.masks.core import gate_values
from subnets.masks.subnetwork import SubnetworkSet
from subnets.models.gates import UnitGates

APPLY = ("forward", "gradient", "both")
CONFIG_FILE, WEIGHTS_FILE, RANKS_FILE = "adapter_config.json", "adapter_model.safetensors", "ranks.json"
PREFIX = "base_model.model."  # peft's prefix of a LoRA model's state dict keys


def _conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's transposed [in, out] weight


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers by name, each once (``state_dict`` also brings
    the weights of a model that trains its subnetworks alone up to date with their values)."""
    state = model.state_dict()
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {n: t.detach() for n, t in state.items() if n in names}


def _column_gates(
    gates: UnitGates, gate_row: torch.Tensor, names: Mapping[int, str]
) -> dict[str, torch.Tensor]:
    """Output-projection module name -> the gate of each of its input features (``[in]``)."""
    if gate_row.ndim != 2 or tuple(gate_row.shape) != gates.shape:
        raise ValueError(f"gate_row must be one row of gates per layer, of shape {gates.shape}; got "
                         f"{tuple(gate_row.shape)} (a batch of per-example gates has no single adapter)")  # fmt: skip
    result: dict[str, torch.Tensor] = {}
    for kind, outputs in gates.outputs.items():
        width = gates.head_dim if kind == "heads" else 1
        for depth, module in enumerate(outputs):
            gate = gate_row[depth, gates.columns[kind]].detach().double().cpu().repeat_interleave(width)
            name = names[id(module.weight)].rpartition(".")[0]
            if name in result and not torch.equal(result[name], gate):
                raise ValueError(f"{name} serves several depths with different gates: one weight change cannot "
                                 "gate them differently (a layer shared between depths, as in ALBERT)")  # fmt: skip
            result[name] = gate
    return result


def lora_adapter(
    trained: nn.Module,
    base: nn.Module,
    gates: UnitGates,
    gate_row: torch.Tensor | None = None,
    *,
    transformer: nn.Module | None = None,
):
    """One language's exact LoRA adapter: what turns ``base`` into ``trained`` computing under
    ``gate_row`` (module docstring: the construction and the rank it needs).

    Args:
        trained: the trained model (e.g. trained with
            [train_subnetworks_only][subnets.masks.compact.train_subnetworks_only]); not changed.
        base: the model it was trained from, with the same parameter names and shapes.
        gates: the [UnitGates][subnets.models.gates.UnitGates] of ``trained`` (or of ``base``): what
            the units own, and the output projections they are gated at.
        gate_row: the language's forward gates ``[layers, units]``
            ([gate_values][subnets.masks.core.gate_values]); None: no gating.
        transformer: the module whose parameters the units belong to (default
            ``trained.base_model``); ``trained``'s parameters outside it are the task head, stored
            whole (``modules_to_save``) where they differ from ``base``.

    Returns:
        The ``peft.LoraConfig`` and the adapter's state dict, with the keys that peft's
        ``get_peft_model_state_dict`` writes (``base_model.model.<module>.lora_A.weight``, ...).

    Raises:
        ValueError: a change the adapter cannot hold (a bias, a norm, an embedding, a weight
            coordinate no unit owns: the model trained shared parameters), naming the tensors;
            models that do not match; ``gate_row`` of the wrong shape.
    """
    from peft import LoraConfig

    transformer = transformer if transformer is not None else getattr(trained, "base_model", trained)
    new, old = _state(trained), _state(base)
    if {n: tuple(t.shape) for n, t in new.items()} != {n: tuple(t.shape) for n, t in old.items()}:
        differ = sorted(set(new) ^ set(old)) or [n for n in new if new[n].shape != old[n].shape]
        raise ValueError(
            f"the trained model and the base model differ in their tensors: {', '.join(differ[:8])}"
        )
    modules = dict(trained.named_modules())
    names = {id(p): n for model in (base, trained) for n, p in model.named_parameters()}
    inside = {id(t) for t in [*transformer.parameters(), *transformer.buffers()]}
    objects = {**dict(trained.named_parameters()), **dict(trained.named_buffers())}
    # weight name -> (owned dims in [out, in] orientation, owned coordinates)
    owned: dict[str, tuple[set[int], torch.Tensor]] = {}
    for record in gates.owned:
        name = names.get(id(record.parameter))
        if name is None:
            raise ValueError("the gates belong to neither the trained nor the base model")
        if record.parameter.ndim != 2:
            continue  # a bias: frozen when the subnetworks train alone (a change is refused below)
        module = modules[name.rpartition(".")[0]]
        empty = torch.zeros(record.parameter.shape, dtype=torch.bool, device=record.parameter.device)
        dims, coordinates = owned.setdefault(name, (set(), empty))
        dims.add(1 - record.dim if _conv1d(module) else record.dim)
        index = [slice(None)] * 2
        index[record.dim] = torch.arange(record.parameter.shape[record.dim])
        coordinates[tuple(index)] = True
    column_gates = {} if gate_row is None else _column_gates(gates, gate_row, names)

    refused, head_modules, deltas = [], set(), {}
    for name, tensor in new.items():
        changed = tensor != old[name]
        if id(objects[name]) not in inside:
            if bool(changed.any()):
                head_modules.add(name.rpartition(".")[0])
            continue
        if name in owned and bool(changed.any()):
            if bool((changed & ~owned[name][1]).any()):
                refused.append(f"{name} (coordinates no unit owns)")
        elif bool(changed.any()):
            refused.append(name)
    if refused:
        raise ValueError(f"cannot export as LoRA adapters: {', '.join(refused)} changed, but only the rows and "
                         "columns of projection weights that units own can be a LoRA delta (the model trained "
                         "shared parameters: train the subnetworks alone, train_subnetworks_only)")  # fmt: skip
    if "" in head_modules:
        raise ValueError("a changed parameter sits on the model itself, not in a module: peft cannot save it")
    within = {id(m) for m in transformer.modules()}
    for module in head_modules:
        if any(id(m) in within for m in modules[module].modules()):
            raise ValueError(
                f"{module} holds both task-head and transformer parameters: peft cannot save it whole"
            )

    for name, (dims, _) in owned.items():
        module_name = name.rpartition(".")[0]
        module = modules[module_name]
        # half precision: the difference in float32, which peft keeps adapters of such models in
        work = torch.promote_types(new[name].dtype, torch.float32)
        w_new, w_old = new[name].to(work), old[name].to(work)
        if _conv1d(module):
            w_new, w_old = w_new.t(), w_old.t()
        gate = column_gates.get(module_name)
        if gate is not None:
            gate = gate.to(w_new.device)
            gated = gate != 1
            target = torch.where(gated, gate.to(w_new.dtype) * w_new, w_new)
        else:
            gated, target = torch.zeros(w_new.shape[1], dtype=torch.bool, device=w_new.device), w_new
        delta = target - w_old
        if not bool(delta.any()) and not bool(gated.any()):
            continue
        if not isinstance(module, nn.Linear) and not _conv1d(module):
            raise ValueError(f"{module_name} is a {type(module).__name__}, not a Linear or Conv1D projection")
        rows, columns = delta.any(dim=1), delta.any(dim=0) | gated
        if bool(gated.any()) or dims == {1}:
            dim = 1  # any delta is exactly its nonzero columns (or rows): the owned dimension gives the fewer
        elif dims == {0}:
            dim = 0
        else:  # owned along both dimensions: the fewer lines
            dim = 0 if int(rows.sum()) <= int(columns.sum()) else 1
        index = (rows if dim == 0 else columns).nonzero().flatten()
        k = len(index)
        if dim == 0:
            lora_a = delta.index_select(0, index)
            lora_b = torch.zeros(delta.shape[0], k, dtype=delta.dtype, device=delta.device)
            lora_b[index, torch.arange(k, device=delta.device)] = 1
        else:
            lora_b = delta.index_select(1, index)
            lora_a = torch.zeros(k, delta.shape[1], dtype=delta.dtype, device=delta.device)
            lora_a[torch.arange(k, device=delta.device), index] = 1
        deltas[module_name] = (lora_a, lora_b)

    if not deltas and not head_modules:
        raise ValueError("nothing to export: the trained model equals the base model under these gates")
    state: dict[str, torch.Tensor] = {}
    for module_name, (lora_a, lora_b) in deltas.items():
        state[f"{PREFIX}{module_name}.lora_A.weight"] = lora_a.contiguous().cpu()
        state[f"{PREFIX}{module_name}.lora_B.weight"] = lora_b.contiguous().cpu()
    for module_name in sorted(head_modules):
        for key, value in modules[module_name].state_dict().items():
            state[f"{PREFIX}{module_name}.{key}"] = value.detach().clone().contiguous().cpu()
    ranks = {m: a.shape[0] for m, (a, _) in deltas.items()}
    top = max(ranks.values(), default=1)
    conv1d = [_conv1d(modules[m]) for m in deltas]
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(deltas),
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): r for m, r in ranks.items()},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=bool(conv1d) and all(conv1d),
        modules_to_save=sorted(head_modules) or None,
        base_model_name_or_path=getattr(getattr(base, "config", None), "_name_or_path", None) or None,
    )
    return config, state


def adapter_rank(config) -> int:
    """The total rank of an adapter made by [lora_adapter][subnets.masks.lora.lora_adapter]: its
    modules' ranks summed."""
    return sum(int(r) for r in config.rank_pattern.values())


def _write_adapter(folder: Path, config, state: dict[str, torch.Tensor]) -> None:
    """``folder/adapter_config.json`` as peft's ``save_pretrained`` writes it, and the weights;
    each file atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    data = {k: list(v) if isinstance(v, set) else v for k, v in data.items()}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(data, indent=2, sort_keys=True))
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def save_lora_adapters(
    trained: nn.Module,
    base: nn.Module,
    masks: SubnetworkSet,
    gates: UnitGates,
    apply: str,
    folder: str | os.PathLike,
    *,
    transformer: nn.Module | None = None,
) -> dict[str, int]:
    """Write every language's adapter ([lora_adapter][subnets.masks.lora.lora_adapter], with its
    forward gates by ``apply``: [gate_values][subnets.masks.core.gate_values]) as a peft adapter
    folder, ``folder/<language>/`` (``adapter_config.json``, ``adapter_model.safetensors``), which
    ``PeftModel.from_pretrained(base, folder / language)`` loads; each file is written atomically.

    Returns:
        The total rank each language's adapter needs (module docstring: changed rows or columns
        plus gated-off columns, summed over modules), also written to ``folder/ranks.json``.

    Raises:
        ValueError: an unknown ``apply``, a language that is no folder name, or a change that no
            adapter can hold ([lora_adapter][subnets.masks.lora.lora_adapter]).
    """
    if apply not in APPLY:
        raise ValueError(f"apply must be one of {', '.join(APPLY)}, got {apply!r}")
    bad = [lang for lang in masks if not lang or lang in (".", "..") or "/" in lang or os.sep in lang]
    if bad:
        raise ValueError(f"languages {bad} cannot name adapter folders")
    folder = Path(folder)
    ranks, shared = {}, None
    for language, subnetwork in masks.items():
        gate_row = gate_values(subnetwork, apply)
        if gate_row is None and shared is not None:
            config, state = shared  # apply=gradient: every language has the whole trained model
        else:
            config, state = lora_adapter(trained, base, gates, gate_row, transformer=transformer)
            if gate_row is None:
                shared = config, state
        _write_adapter(folder / language, config, state)
        ranks[language] = adapter_rank(config)
    atomic_write_json(folder / RANKS_FILE, ranks)
    return ranks
