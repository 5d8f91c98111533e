"""Gates on a transformer's units: attention heads and feed-forward neurons.

transformers 5 ignores ``unit_mask`` and has no ``prune_heads``, so units are gated where their
outputs meet: a forward pre-hook on each layer's attention output projection views its input
``[..., H * d]`` as ``[..., H, d]`` and multiplies head ``h`` by its gate; one on the
feed-forward output projection multiplies intermediate unit ``j`` by its gate. This works for
every layout :mod:`subnets.models.layouts` detects or is given (BERT-style encoders,
ModernBERT, T5/mT5 encoders, XLM, ALBERT, decoder LLMs with grouped-query attention), in
transformers 4 and 5, with eager and sdpa attention.

* With no gates set (the default) the hooks return at once and the model is unchanged.
* Gates of 1 give exactly the ungated output; a gate of 0 gives exactly the output of the model
  whose output-projection columns for that unit are zero.
* Gates that require grad receive ``dL/dgate`` (importance, Michel et al. 2019).

Gate values are one tensor ``[layers, units]``; with several kinds of unit (``units="both"``)
its columns hold the heads first, then the neurons (``gates.units``: kind -> count).

Example::

    gates = HeadGates(model)                  # model: any supported AutoModel
    g = torch.ones(gates.shape, requires_grad=True)
    with gates.applied(g):
        loss = model(**inputs).last_hidden_state.sum()
    loss.backward()                           # g.grad: [layers, heads]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from subnets.models.layouts import UNIT_KINDS, ModelLayout, Owned, resolve_layout

UNIT_CHOICES = {"heads": ("heads",), "neurons": ("neurons",), "both": ("heads", "neurons")}


class _Gate:
    """Forward pre-hook of one output projection: multiplies its input by the gates of ``kind``
    at its depth (a layer shared by several ``depths`` counts its kind's calls since the forward
    began: they run depth after depth). An object, so that a deep copy of the model rebinds it."""

    def __init__(self, owner: UnitGates, kind: str, depths: list[int]):
        self.owner, self.kind, self.depths = owner, kind, depths

    def __call__(self, module: nn.Module, args: tuple):
        owner = self.owner
        gates = owner.values
        if gates is None:
            return None
        if len(self.depths) == 1:
            depth = self.depths[0]
        else:  # a shared layer: the depth is the number of this kind's calls since the forward began
            depth = owner.calls[self.kind]
            owner.calls[self.kind] += 1
        x = args[0]
        columns = owner.columns[self.kind]
        gate = gates[depth, columns].to(x.dtype)
        if self.kind == "neurons":
            return (x * gate, *args[1:])
        gated = (x.unflatten(-1, (gate.shape[0], -1)) * gate[:, None]).flatten(-2)
        return (gated, *args[1:])


class UnitGates:
    """Multiplies the output of every unit of ``model`` (of the kinds ``units``) by a settable gate.

    Args:
        model: a Hugging Face transformer (the bare model, e.g. ``AutoModel``).
        units: ``"heads"``, ``"neurons"`` or ``"both"``.
        layout: a :class:`~subnets.models.layouts.ModelLayout` (default: detected).

    Attributes:
        layout: the layout in use; num_layers: depth; units: kind -> units per layer (in column
        order); columns: kind -> its slice of a gate row; outputs: kind -> the projection gated
        at each depth (its input holds the units' outputs); owned: what each unit owns
        (:class:`~subnets.models.layouts.Owned`, unit indices as gate columns);
        values: the gates in use, ``[num_layers, sum(units)]``, or None for no gating.
        num_heads, head_dim (with heads), num_neurons (with neurons).
    """

    def __init__(self, model: nn.Module, units: str = "heads", layout: ModelLayout | None = None):
        if units not in UNIT_CHOICES:
            raise ValueError(f"units must be one of {', '.join(UNIT_CHOICES)}, got {units!r}")
        self.layout = resolve_layout(model, layout)
        self.units: dict[str, int] = {}
        self.columns: dict[str, slice] = {}
        self.outputs: dict[str, list[nn.Linear]] = {}
        self.owned: list[Owned] = []
        self.values: torch.Tensor | None = None
        self.calls = {kind: 0 for kind in UNIT_CHOICES[units]}
        self._handles = []
        start, shared = 0, False
        for kind in UNIT_CHOICES[units]:
            found = UNIT_KINDS[kind](model, self.layout)
            self.units[kind] = found.count
            self.columns[kind] = slice(start, start + found.count)
            self.outputs[kind] = found.outputs
            self.owned += [Owned(o.layer, o.parameter, o.dim, o.owners + start) for o in found.owned]
            start += found.count
            if kind == "heads":
                self.num_heads, self.head_dim = found.count, found.width
            else:
                self.num_neurons = found.count
            depths: dict[nn.Module, list[int]] = {}
            for depth, output in enumerate(found.outputs):
                depths.setdefault(output, []).append(depth)
            self._handles += [
                output.register_forward_pre_hook(_Gate(self, kind, d)) for output, d in depths.items()
            ]
            self.num_layers = len(found.outputs)
            shared = shared or len(depths) < len(found.outputs)
        if shared:  # layers shared by several depths: the depth is the call's order since the forward's start
            self._handles.append(model.register_forward_pre_hook(self._restart))

    def _restart(self, module: nn.Module, args: tuple) -> None:
        for kind in self.calls:
            self.calls[kind] = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, sum(self.units.values()))

    def set(self, values: torch.Tensor | None) -> None:
        """Use ``values`` (``[layers, units]``, float or bool) from now on; None removes gating."""
        if values is not None:
            if tuple(values.shape) != self.shape:
                raise ValueError(f"gates must have shape {self.shape} (layers, {' + '.join(self.units)}), "
                                 f"got {tuple(values.shape)}")  # fmt: skip
            if values.dtype == torch.bool:
                values = values.float()
        self.values = values

    @contextlib.contextmanager
    def applied(self, values: torch.Tensor | None) -> Iterator[None]:
        """Use ``values`` inside the ``with`` block, then restore the previous gates."""
        previous = self.values
        self.set(values)
        try:
            yield
        finally:
            self.values = previous

    def owned_parameters(self) -> list[nn.Parameter]:
        """Every parameter some unit owns coordinates of (each once)."""
        return list({id(o.parameter): o.parameter for o in self.owned}.values())

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class HeadGates(UnitGates):
    """:class:`UnitGates` on attention heads: ``shape`` is ``[layers, heads]``."""

    def __init__(self, model: nn.Module, layout: ModelLayout | None = None):
        super().__init__(model, "heads", layout)


class NeuronGates(UnitGates):
    """:class:`UnitGates` on feed-forward neurons: ``shape`` is ``[layers, intermediate units]``."""

    def __init__(self, model: nn.Module, layout: ModelLayout | None = None):
        super().__init__(model, "neurons", layout)
