"""Gates on the attention heads of a Hugging Face encoder.

transformers 5 ignores ``head_mask`` and has no ``prune_heads``, so heads are gated where their
outputs meet: a forward pre-hook on each layer's attention output projection views its input
``[..., H * d]`` as ``[..., H, d]`` and multiplies head ``h`` by ``gates[layer, h]``. This works
for BERT- and XLM-R-style encoders in transformers 4 and 5, with eager and sdpa attention.

* With no gates set (the default) the hooks return at once and the model is unchanged.
* Gates of 1 give exactly the ungated output; a gate of 0 gives exactly the output of the model
  whose output-projection columns for that head are zero.
* Gates that require grad receive ``dL/dgate`` (head importance, Michel et al. 2019).

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

# Where the per-layer list and, inside a layer, the attention projections live, by family.
_LAYER_LISTS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")
_PROJECTIONS = (
    # (query, key, value, output) in BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT, mBERT, ...
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    # DistilBERT
    ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
    # DeBERTa-v2/v3 (fused query_proj etc.)
    (
        "attention.self.query_proj",
        "attention.self.key_proj",
        "attention.self.value_proj",
        "attention.output.dense",
    ),
)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def find_attention_layers(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """For every transformer layer, its ``query``, ``key``, ``value`` and ``output`` projections.

    Raises:
        NotImplementedError: the model's layout is none of the known ones (the message lists them).
    """
    for list_path in _LAYER_LISTS:
        layers = _get(model, list_path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        for paths in _PROJECTIONS:
            found = [[_get(layer, p) for p in paths] for layer in layers]
            if all(isinstance(m, nn.Linear) for row in found for m in row):
                return [dict(zip(("query", "key", "value", "output"), row)) for row in found]
    raise NotImplementedError(
        f"cannot locate attention heads in {type(model).__name__}: expected a layer list at one of "
        f"{_LAYER_LISTS} whose layers have Linear projections at one of {[p[3] for p in _PROJECTIONS]}"
    )


class _LayerGate:
    """Forward pre-hook of one layer's output projection (an object, so that deepcopy rebinds it)."""

    def __init__(self, owner: HeadGates, layer: int):
        self.owner, self.layer = owner, layer

    def __call__(self, module: nn.Module, args: tuple):
        gates = self.owner.values
        if gates is None:
            return None
        x = args[0]
        heads = self.owner.num_heads
        gate = gates[self.layer].to(x.dtype).view(heads, 1)
        gated = (x.unflatten(-1, (heads, -1)) * gate).flatten(-2)
        return (gated, *args[1:])


class HeadGates:
    """Multiplies the output of every attention head of ``model`` by a settable gate.

    Attributes:
        num_layers, num_heads, head_dim: the model's attention geometry.
        layers: per layer, the ``query``, ``key``, ``value`` and ``output`` projections.
        values: the gates in use, ``[num_layers, num_heads]``, or None for no gating.
    """

    def __init__(self, model: nn.Module):
        self.layers = find_attention_layers(model)
        self.num_layers = len(self.layers)
        self.num_heads = int(model.config.num_attention_heads)
        in_features = self.layers[0]["output"].in_features
        if in_features % self.num_heads:
            raise ValueError(
                f"output projection width {in_features} is not divisible by {self.num_heads} heads"
            )
        self.head_dim = in_features // self.num_heads
        self.values: torch.Tensor | None = None
        self._handles = [
            layer["output"].register_forward_pre_hook(_LayerGate(self, i))
            for i, layer in enumerate(self.layers)
        ]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_heads)

    def set(self, values: torch.Tensor | None) -> None:
        """Use ``values`` (``[layers, heads]``, float or bool) from now on; None removes gating."""
        if values is not None:
            if tuple(values.shape) != self.shape:
                raise ValueError(
                    f"head gates must have shape {self.shape} (layers, heads), got {tuple(values.shape)}"
                )
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

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
