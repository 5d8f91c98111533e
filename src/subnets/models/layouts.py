"""Where a transformer keeps its attention heads and feed-forward neurons: declared layouts.

A [ModelLayout][subnets.models.layouts.ModelLayout] says, by attribute paths, where the layer list is and
which linear projections of a layer belong to its attention (query, key, value and output, or one fused
query-key-value projection and its split order) and to its feed-forward block (the input
projections, gate and up projections of gated MLPs included, and the output projection). It
is detected for the families in ``LAYOUTS`` ([detect_layout][subnets.models.layouts.detect_layout]) and can be
declared for any other model, in code or as ``model.layout`` in a config::

    layout = ModelLayout(
        attention=AttentionLayout(layers="model.blocks", output="attn.proj", qkv="attn.qkv"),
        feed_forward=FeedForwardLayout(layers="model.blocks", inputs=["mlp.fc1"], output="mlp.fc2"),
    )
    gates = HeadGates(transformer, layout=layout)

What a unit owns follows from the layout ([subnets.models.ownership][]:
[head_units][subnets.models.ownership.head_units], [neuron_units][subnets.models.ownership.neuron_units]):

* Head ``h`` (of ``H`` query heads, head size ``d``) owns rows ``h*d:(h+1)*d`` of the query
  projection (weight and bias) and columns ``h*d:(h+1)*d`` of the output projection. Its key and
  value rows are those of its key-value head ``g = h // (H / H_kv)``: with grouped-query
  attention (``H_kv < H``) a key-value head is owned by its whole group, so it is updated while
  any query head of the group is in the subnetwork and frozen only when all of them are out.
  In a fused projection the same rules apply inside each of its query, key and value blocks
  (``qkv_layout``: blocked, or interleaved per key-value head).
* Neuron ``j`` of a feed-forward block with ``I`` intermediate units owns row ``j`` of every
  input projection (gate and up projections alike; in a fused input projection holding
  ``fused_inputs`` blocks of ``I`` rows, row ``j`` of each block) and column ``j`` of the output
  projection.
* Shared layers (ALBERT: fewer physical layers than ``config.num_hidden_layers``): gates and
  masks are per depth, as for any model, and depth ``i`` runs physical layer
  ``i * P // L``. A coordinate of a shared weight is owned by that unit at every depth the
  layer serves: it is updated while the unit is kept at any of those depths and frozen only
  when it is masked at all of them.

Weights no unit owns (embeddings, normalisation, attention biases of the output projection,
T5's relative position bias, ...) are shared by every language.

Projections are ``torch.nn.Linear`` (weight ``[out, in]``) or GPT-2's ``Conv1D`` (weight
``[in, out]``): a unit's rows are its output features and its columns its input features in
either. Every layout is checked once when gates are put on a model
([check_layout][subnets.models.gates.check_layout] in [subnets.models.gates][]): a probe gates one unit of
each kind off and compares the coordinates with zero gradient with those the layout says the unit owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class AttentionLayout:
    """Where a layer's attention projections are.

    Attributes:
        layers: path of the layer list inside the transformer (``*`` matches every entry of a
            list on the way, e.g. ``encoder.albert_layer_groups.*.albert_layers.0``).
        output: the attention output projection inside a layer (its input is ``[..., H * d]``).
        query, key, value: the separate projections, or None with ``qkv``.
        qkv: one fused projection whose rows hold the query, key and value blocks ...
        qkv_order: ... in this order ...
        qkv_layout: ... ``blocked`` (all query heads, then all key heads, then all value heads:
            ModernBERT, GPT-2) or ``interleaved`` (per key-value head, its group's query heads,
            then its key and its value head: GPT-NeoX, Bloom, Falcon).
        num_heads, num_kv_heads: None: the model config's ``num_attention_heads`` and
            ``num_key_value_heads`` (or ``num_kv_heads``; else as many as query heads).
    """

    layers: str
    output: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    qkv: str | None = None
    qkv_order: list[str] = field(default_factory=lambda: ["query", "key", "value"])
    qkv_layout: str = "blocked"
    num_heads: int | None = None
    num_kv_heads: int | None = None


@dataclass
class FeedForwardLayout:
    """Where a layer's feed-forward projections are.

    Attributes:
        layers: path of the layer list (it may differ from the attention's, as in XLM).
        inputs: the input projections whose rows are the intermediate units (gate and up
            projections of a gated MLP).
        output: the output projection whose columns are the intermediate units.
        fused_inputs: blocks of ``I`` rows in each input projection (2 for ModernBERT's fused
            ``Wi``, which holds the input and the gate).
    """

    layers: str
    inputs: list[str]
    output: str
    fused_inputs: int = 1


@dataclass
class ModelLayout:
    """A model family's layout (module docstring). ``causal``: a decoder whose tokens see only
    what precedes them, so words are read from their last subword and the root from the
    sentence's final token ([Collator][subnets.data.batching.Collator])."""

    attention: AttentionLayout
    feed_forward: FeedForwardLayout | None = None
    causal: bool = False
    family: str = "declared"

    @classmethod
    def from_dict(cls, value) -> ModelLayout:
        """A layout from a mapping (``model.layout`` of a config: ``attention``, optional
        ``feed_forward`` and ``causal``), with an error naming the setting when it does not fit."""
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)
        try:
            unknown = set(plain) - {"attention", "feed_forward", "causal", "family"}
            if unknown:
                raise TypeError(f"unknown key(s) {sorted(unknown)}")
            ff = plain.get("feed_forward")
            return cls(AttentionLayout(**plain["attention"]), FeedForwardLayout(**ff) if ff else None,
                       bool(plain.get("causal", False)))  # fmt: skip
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"model.layout={plain}: {error}; expected {{attention: {{layers, output, query, key, value (or qkv, "
                "qkv_order, qkv_layout), num_heads, num_kv_heads}, feed_forward: {layers, inputs, output, fused_inputs}, causal}"
            ) from None


def _bert_like(prefix: str, query: str, key: str, value: str) -> ModelLayout:
    return ModelLayout(
        AttentionLayout(prefix, "attention.output.dense", query, key, value),
        FeedForwardLayout(prefix, ["intermediate.dense"], "output.dense"),
    )


def _t5(inputs: list[str]) -> ModelLayout:
    block = "layer.1.DenseReluDense."
    return ModelLayout(
        AttentionLayout(
            "encoder.block",
            "layer.0.SelfAttention.o",
            "layer.0.SelfAttention.q",
            "layer.0.SelfAttention.k",
            "layer.0.SelfAttention.v",
        ),  # fmt: skip
        FeedForwardLayout("encoder.block", [block + name for name in inputs], block + "wo"),
    )


_ALBERT_LAYERS = "encoder.albert_layer_groups.*.albert_layers.0"

#: Layouts tried in order by [detect_layout][subnets.models.layouts.detect_layout], by family; the first whose
#: every path leads to a linear projection in every layer is taken.
LAYOUTS: dict[str, ModelLayout] = {
    # BERT, RoBERTa, XLM-R, ELECTRA, RemBERT, CamemBERT, mBERT, multilingual-e5, ...
    "bert": _bert_like("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value"),
    "deberta-v2": _bert_like(
        "encoder.layer", "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"
    ),  # fmt: skip
    "distilbert": ModelLayout(
        AttentionLayout(
            "transformer.layer", "attention.out_lin", "attention.q_lin", "attention.k_lin", "attention.v_lin"
        ),  # fmt: skip
        FeedForwardLayout("transformer.layer", ["ffn.lin1"], "ffn.lin2"),
    ),
    "xlm": ModelLayout(
        AttentionLayout("attentions", "out_lin", "q_lin", "k_lin", "v_lin"),
        FeedForwardLayout("ffns", ["lin1"], "lin2"),
    ),
    "modernbert": ModelLayout(
        AttentionLayout("layers", "attn.Wo", qkv="attn.Wqkv"),
        FeedForwardLayout("layers", ["mlp.Wi"], "mlp.Wo", fused_inputs=2),
    ),
    "t5-gated": _t5(["wi_0", "wi_1"]),  # mT5, T5 v1.1: gated-GELU
    "t5": _t5(["wi"]),
    "albert": ModelLayout(
        AttentionLayout(
            _ALBERT_LAYERS, "attention.dense", "attention.query", "attention.key", "attention.value"
        ),
        FeedForwardLayout(_ALBERT_LAYERS, ["ffn"], "ffn_output"),
    ),
    # decoders with a fused, per-head interleaved query-key-value projection
    "gpt_neox": ModelLayout(
        AttentionLayout(
            "layers", "attention.dense", qkv="attention.query_key_value", qkv_layout="interleaved"
        ),
        FeedForwardLayout("layers", ["mlp.dense_h_to_4h"], "mlp.dense_4h_to_h"),
        causal=True,
    ),
    # Bloom, and Falcon's new decoder architecture (grouped: per key-value head, its query heads, key, value)
    "bloom": ModelLayout(
        AttentionLayout(
            "h", "self_attention.dense", qkv="self_attention.query_key_value", qkv_layout="interleaved"
        ),
        FeedForwardLayout("h", ["mlp.dense_h_to_4h"], "mlp.dense_4h_to_h"),
        causal=True,
    ),
    # GPT-2: Conv1D projections (weight [in, out]), a blocked fused c_attn
    "gpt2": ModelLayout(
        AttentionLayout("h", "attn.c_proj", qkv="attn.c_attn"),
        FeedForwardLayout("h", ["mlp.c_fc"], "mlp.c_proj"),
        causal=True,
    ),
    # decoder LLMs with separate q/k/v/o and gate/up/down projections: Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, ...
    "llama": ModelLayout(
        AttentionLayout(
            "layers", "self_attn.o_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
        ),
        FeedForwardLayout("layers", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"),
        causal=True,
    ),
}
for _family, _layout in LAYOUTS.items():
    _layout.family = _family


class UnknownLayoutError(NotImplementedError):
    """No declared or known layout fits the model."""


def get_module(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules at ``path`` (attribute names and list indices separated by dots; ``*``
    takes every entry of a list) below ``root``; empty if the path leads nowhere."""
    found = [root]
    for name in path.split("."):
        step = []
        for module in found:
            if name == "*":
                step.extend(module if isinstance(module, nn.ModuleList) else [])
            else:
                child = getattr(module, name, None)
                if child is not None:
                    step.append(child)
        found = step
    return found


def layer_list(model: nn.Module, path: str) -> list[nn.Module]:
    """The layers at ``path`` (a layout's ``layers``: a ModuleList, or a path with ``*``)."""
    found = get_module(model, path)
    if "*" not in path:
        found = list(found[0]) if len(found) == 1 and isinstance(found[0], nn.ModuleList) else []
    return found


def is_projection(module: nn.Module) -> bool:
    """A ``torch.nn.Linear`` or a GPT-2-style ``Conv1D`` (a linear map with the weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def features(projection: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection
    ([is_projection][subnets.models.layouts.is_projection])."""
    if isinstance(projection, nn.Linear):
        return projection.in_features, projection.out_features
    return tuple(projection.weight.shape)  # Conv1D: [in, out]


def layer_projections(model: nn.Module, layers: str, paths: list[str]) -> list[list[nn.Module]] | None:
    """Per physical layer, the projections at ``paths``; None unless every one exists."""
    physical = layer_list(model, layers)
    if not physical:
        return None
    rows = []
    for layer in physical:
        row = [get_module(layer, p) for p in paths]
        if not all(len(m) == 1 and is_projection(m[0]) for m in row):
            return None
        rows.append([m[0] for m in row])
    return rows


def attention_paths(layout: AttentionLayout) -> list[str]:
    separate = [layout.query, layout.key, layout.value]
    if layout.qkv is None and None in separate:
        raise ValueError("an attention layout needs query, key and value projections, or a fused qkv")
    return [layout.output, *([layout.qkv] if layout.qkv else separate)]


def fits(model: nn.Module, layout: ModelLayout) -> bool:
    """Whether every path of ``layout`` leads to a linear projection in every layer of ``model``."""
    attention = layout.attention
    if layer_projections(model, attention.layers, attention_paths(attention)) is None:
        return False
    ff = layout.feed_forward
    return ff is None or layer_projections(model, ff.layers, [*ff.inputs, ff.output]) is not None


def detect_layout(model: nn.Module) -> ModelLayout:
    """The first layout of ``LAYOUTS`` that fits ``model``.

    Raises:
        UnknownLayoutError: none fits; the message says what to declare.
    """
    for layout in LAYOUTS.values():
        if fits(model, layout):
            return layout
    raise UnknownLayoutError(
        f"cannot locate the attention heads of {type(model).__name__} (model_type "
        f"{getattr(getattr(model, 'config', None), 'model_type', '?')!r}): none of the known layouts "
        f"({', '.join(LAYOUTS)}) fits. Declare its layout: model.layout (in a config) or "
        "layout=ModelLayout(attention=AttentionLayout(layers=<path of the layer list>, output=<attention "
        "output projection>, query=..., key=..., value=... or qkv=<fused projection>), feed_forward="
        "FeedForwardLayout(layers=..., inputs=[...], output=...)) (subnets.models.layouts; "
        "docs/guides/models.md)."
    )


def resolve_layout(model: nn.Module, layout: ModelLayout | None) -> ModelLayout:
    """``layout`` checked against ``model`` (a clear error where a path does not fit), or the
    detected one."""
    if layout is None:
        return detect_layout(model)
    if not isinstance(layout, ModelLayout):  # a config node or a dictionary
        layout = ModelLayout.from_dict(layout)
    if not fits(model, layout):
        raise UnknownLayoutError(
            f"the declared layout does not fit {type(model).__name__}: every path of {layout} must lead to a "
            "torch.nn.Linear (or a GPT-2 Conv1D) in every layer (paths are relative to the transformer for 'layers', to a layer "
            "for the projections)"
        )
    return layout
