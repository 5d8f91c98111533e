"""Gates on a transformer's units: attention heads and feed-forward neurons.

transformers 5 ignores ``unit_mask`` and has no ``prune_heads``, so units are gated where their
outputs meet: a forward pre-hook on each layer's attention output projection views its input
``[..., H * d]`` as ``[..., H, d]`` and multiplies head ``h`` by its gate; one on the
feed-forward output projection multiplies intermediate unit ``j`` by its gate. This works for
every layout [subnets.models.layouts][] detects or is given (BERT-style encoders,
ModernBERT, T5/mT5 encoders, XLM, ALBERT, decoder LLMs with grouped-query attention), in
transformers 4 and 5, with eager and sdpa attention.

* With no gates set (the default) the hooks return at once and the model is unchanged.
* Gates of 1 give exactly the ungated output; a gate of 0 gives exactly the output of the model
  whose output-projection columns for that unit are zero.
* Gates that require grad receive ``dL/dgate`` (importance, Michel et al. 2019).
* Gates of shape ``[batch, layers, units]`` gate each example with its own row (a batch mixing
  languages, each example through its language's units); ``dL/dgate`` is then per example.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

import torch
from torch import nn

from subnets.models.layouts import ModelLayout, resolve_layout
from subnets.models.ownership import UNIT_KINDS, Owned

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
        gate = gates[..., depth, columns].to(x.dtype)  # [units], or [batch, units] per example
        if gate.ndim == 2:
            if x.shape[0] != gate.shape[0]:
                raise ValueError(f"per-example gates for {gate.shape[0]} examples, but the {self.kind}' output "
                                 f"projection at depth {depth} sees input of shape {tuple(x.shape)} (the batch "
                                 "first is expected; a model that packs its batch cannot take per-example gates)")  # fmt: skip
            gate = gate.view(gate.shape[0], *[1] * (x.ndim - 2), gate.shape[1])
        if self.kind == "neurons":
            return (x * gate, *args[1:])
        gated = (x.unflatten(-1, (gate.shape[-1], -1)) * gate[..., None]).flatten(-2)
        return (gated, *args[1:])


def gate_probe(shape: tuple[int, int], values: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Gate values to take gradients through: a new leaf holding ``values`` (default: ones of
    ``shape``) on the device and in the precision of ``like``, a parameter of the gated model
    (so that gate gradients are float64 in a float64 model)."""
    start = torch.ones(shape) if values is None else values.detach().float().clone()
    return start.to(like.device, like.dtype).requires_grad_(True)


class UnitGates:
    """Multiplies the output of every unit of ``model`` (of the kinds ``units``) by a settable gate.

    Args:
        model: a Hugging Face transformer (the bare model, e.g. ``AutoModel``).
        units: ``"heads"``, ``"neurons"`` or ``"both"``.
        layout: a [ModelLayout][subnets.models.layouts.ModelLayout] (default: detected).
        check: probe the layout on the model ([check_layout][subnets.models.gates.check_layout]) with random
            token ids (True), with ``check(model)`` (a callable that runs a model taking other input and
            returns an output tensor), or not at all (False).

    Attributes:
        layout: the layout in use.
        num_layers: the depth.
        units: kind -> units per layer (in column order).
        columns: kind -> its slice of a gate row.
        outputs: kind -> the projection gated at each depth (its input holds the units' outputs).
        owned: what each unit owns ([Owned][subnets.models.ownership.Owned], unit indices as gate
            columns).
        values: the gates in use, ``[num_layers, sum(units)]``, or None for no gating.
        num_heads: with heads, the query heads per layer (``head_dim``: their width).
        num_neurons: with neurons, the intermediate units per layer.
    """

    def __init__(self, model: nn.Module, units: str = "heads", layout: ModelLayout | None = None,
                 check: bool | Callable[[nn.Module], torch.Tensor] = True):  # fmt: skip
        if units not in UNIT_CHOICES:
            raise ValueError(f"units must be one of {', '.join(UNIT_CHOICES)}, got {units!r}")
        self.layout = resolve_layout(model, layout)
        self.units: dict[str, int] = {}
        self.columns: dict[str, slice] = {}
        self.outputs: dict[str, list[nn.Module]] = {}
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
        # query heads per key-value head (grouped-query attention: a key-value head's owners)
        self.kv_group = max((o.owners.shape[1] for o in self.owned), default=1)
        if check:
            check_layout(model, self, None if check is True else check)

    def _restart(self, module: nn.Module, args: tuple) -> None:
        for kind in self.calls:
            self.calls[kind] = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, sum(self.units.values()))

    def set(self, values: torch.Tensor | None) -> None:
        """Use ``values`` from now on (float or bool): ``[layers, units]`` for the whole batch, or
        ``[batch, layers, units]`` for one row of gates per example (mixed-language batches); None
        removes gating."""
        if values is not None:
            if tuple(values.shape[-2:]) != self.shape or values.ndim not in (2, 3):
                raise ValueError(f"gates must have shape {self.shape} (layers, {' + '.join(self.units)}), or "
                                 f"(batch, *{self.shape}) per example; got {tuple(values.shape)}")  # fmt: skip
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

    def replace_parameters(self, replacements: Mapping[int, nn.Parameter]) -> None:
        """Point the ownership records at new parameter objects (``id`` of the old one -> the
        new one), e.g. the DTensors FSDP2's ``fully_shard`` puts in place of a model's parameters."""
        self.owned = [
            replace(o, parameter=replacements.get(id(o.parameter), o.parameter)) for o in self.owned
        ]

    def owned_parameters(self) -> list[nn.Parameter]:
        """Every parameter some unit owns coordinates of (each once)."""
        return list({id(o.parameter): o.parameter for o in self.owned}.values())

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class HeadGates(UnitGates):
    """[UnitGates][subnets.models.gates.UnitGates] on attention heads: ``shape`` is ``[layers, heads]``."""

    def __init__(self, model: nn.Module, layout: ModelLayout | None = None):
        super().__init__(model, "heads", layout)


class NeuronGates(UnitGates):
    """[UnitGates][subnets.models.gates.UnitGates] on feed-forward neurons: ``shape`` is
    ``[layers, intermediate units]``."""

    def __init__(self, model: nn.Module, layout: ModelLayout | None = None):
        super().__init__(model, "neurons", layout)


def check_layout(
    model: nn.Module,
    gates: UnitGates,
    run: Callable[[nn.Module], torch.Tensor] | None = None,
    tokens: int = 16,
) -> None:
    """Check ``gates.layout`` on ``model`` with a gradient probe: gate off, at the first depth,
    the last unit of each kind (the last group of query heads sharing a key-value head) and
    compare, for every projection the layout gives a unit, the rows or columns whose gradient is
    zero with those the layout says the gated units own ([subnets.models.layouts][]).

    Every coordinate the gated units own alone must get a zero gradient (a layout that gives a
    unit what another unit uses would freeze and train the wrong weights); for attention head
    weights, every zero row or column must belong to them (not for neurons, which may be dead
    under ReLU, nor for biases: a key bias gets no gradient at all). The probe is
    one forward and backward pass in eval mode, of ``tokens`` random token ids (a Hugging Face
    model) or of ``run(model)``, on generators of its own: the model, its mode and the global
    random state are left as they were.

    Raises:
        ValueError: naming the projection, the unit and the rows or columns that disagree.
    """
    mask = torch.ones(gates.shape)
    for kind, columns in gates.columns.items():
        size = gates.kv_group if kind == "heads" else 1
        mask[0, columns.stop - size : columns.stop] = 0
    kinds = {kind: (c.start, c.stop) for kind, c in gates.columns.items()}
    # (parameter, owned dim) -> [kind, kept along the dim: some unit left on owns the entry]
    expected: dict[tuple[int, int], list] = {}
    parameters: dict[int, nn.Parameter] = {}
    for owned in gates.owned:
        if not owned.parameter.requires_grad:
            continue
        kind = next(k for k, (a, b) in kinds.items() if a <= int(owned.owners.min()) < b)
        keep = mask[owned.layer][owned.owners].bool().any(dim=1)
        entry = expected.setdefault((id(owned.parameter), owned.dim), [kind, torch.zeros_like(keep)])
        entry[1] = entry[1] | keep
        parameters[id(owned.parameter)] = owned.parameter
    if all(bool(keep.all()) for _, keep in expected.values()):
        return  # nothing the probe could see (e.g. every owned weight frozen)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    if run is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise ValueError(f"cannot probe the layout of {type(model).__name__} with token ids (it has no "
                             "config.vocab_size): pass check=<a function that runs the model and returns its "
                             "output> or check=False (the layout then goes unchecked)")  # fmt: skip
        input_ids = torch.randint(0, int(vocab), (1, tokens), generator=generator).to(device)

        def run(model: nn.Module) -> torch.Tensor:
            output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state

    names = {id(p): n for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), gates.applied(mask.to(device)):
            hidden = run(model)
            weights = torch.randn(hidden.shape, generator=generator).to(hidden.device, hidden.dtype)
            grads = torch.autograd.grad(
                (hidden * weights).sum(), list(parameters.values()), allow_unused=True
            )
    finally:
        model.train(was_training)
    grad_of = dict(zip(parameters, grads))
    for (pid, dim), (kind, keep) in expected.items():
        grad = grad_of[pid] if grad_of[pid] is not None else torch.zeros_like(parameters[pid])
        other = [d for d in range(grad.ndim) if d != dim]
        zero = (grad.abs().amax(dim=other) == 0).cpu() if other else (grad == 0).cpu()
        # the other way round only for head weights: ReLU neurons can be dead, and the gradient of a key
        # bias is zero in theory (softmax ignores what adds the same score to every key)
        wrong = ~keep != zero if kind == "heads" and grad.ndim > 1 else ~keep & ~zero
        if bool(wrong.any()):
            what = "rows" if dim == 0 else "columns"
            raise ValueError(
                f"the {gates.layout.family} layout does not fit {type(model).__name__}: with the last "
                f"{'head(s)' if kind == 'heads' else 'neuron'} of layer 0 gated off, the layout says {what} "
                f"{_ranges(~keep)} of {names.get(pid, '?')} get no gradient, but the gradient is zero in {what} "
                f"{_ranges(zero)}. Fix the layout (model.layout; for a fused projection its qkv_order and qkv_layout: "
                "blocked or interleaved); docs/guides/models.md."
            )


def _ranges(flags: torch.Tensor) -> str:
    """``0-7, 32-39`` for the indices where ``flags`` is true (``none`` if there are none)."""
    indices = torch.nonzero(flags).flatten().tolist()
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs) or "none"
