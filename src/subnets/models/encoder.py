"""Multilingual encoders: loading, the built-in tiny model, and the learned scalar mix of layers."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from subnets.models.gates import UnitGates
from subnets.models.layouts import ModelLayout

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# Models whose BPE tokenizer needs a leading space to tokenize pre-split words as in running text.
_PREFIX_SPACE_TYPES = {"roberta", "longformer", "bart", "deberta", "gpt2"}
# Encoder-decoder families whose encoder is used alone (AutoModel would build both halves).
_ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class ScalarMix(nn.Module):
    """``gamma * sum_i softmax(w)_i * layer_i`` over the encoder's layers (UDify).

    With ``dropout > 0``, each layer's weight is dropped (set to -inf before the softmax) with
    that probability during training, as UDify's layer dropout; at least one layer is kept.
    """

    def __init__(self, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(()))
        self.dropout = dropout

    def forward(self, layers: Iterable[torch.Tensor]) -> torch.Tensor:
        layers = list(layers)
        weights = self.weights
        if self.training and self.dropout > 0:
            drop = torch.rand(len(layers), device=weights.device) < self.dropout
            if not drop.all():
                weights = weights.masked_fill(drop, float("-inf"))
        probabilities = torch.softmax(weights, dim=0)
        mixed = probabilities[0] * layers[0]
        for p, layer in zip(probabilities[1:], layers[1:]):
            mixed = mixed + p * layer
        return self.gamma * mixed


class Encoder(nn.Module):
    """A Hugging Face transformer with unit gates and a scalar mix, returning word representations.

    ``forward`` maps a [Batch][subnets.data.batching.Batch]'s subword input to ``[B, 1 + W, D]``
    word representations at the positions the batch's ``word_index`` names (the collator
    reads each word from its first subword and the root from ``[CLS]`` in a bidirectional
    encoder; from its last subword and the root from the final token in a causal decoder,
    ``gates.layout.causal``). With ``autocast`` (a dtype, e.g. ``torch.bfloat16``) the
    transformer runs under ``torch.autocast`` on its device (weights stay float32); its hidden
    states are returned to float32 for the scalar mix and the task model.

    Args:
        units: the gated units, ``heads``, ``neurons`` or ``both``
            ([UnitGates][subnets.models.gates.UnitGates]).
        layout: the transformer's [ModelLayout][subnets.models.layouts.ModelLayout] (default: detected).
    """

    def __init__(self, transformer: nn.Module, mix_dropout: float = 0.0, autocast: torch.dtype | None = None,
                 units: str = "heads", layout: ModelLayout | None = None):  # fmt: skip
        super().__init__()
        self.transformer = transformer
        self.autocast = autocast
        self.mix = ScalarMix(transformer.config.num_hidden_layers, mix_dropout)
        self.gates = UnitGates(transformer, units, layout)
        self.hidden_size = int(transformer.config.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor
    ) -> torch.Tensor:
        precision = (
            nullcontext() if self.autocast is None else torch.autocast(input_ids.device.type, self.autocast)
        )
        with precision:
            out = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
            )
        hidden = out.hidden_states[1:]
        if self.autocast is not None:
            hidden = [h.float() for h in hidden]
        mixed = self.mix(hidden)
        return mixed.reshape(-1, mixed.shape[-1])[word_index]

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]``: the transformer's last hidden layer (what a language-model head reads),
        in the weights' precision (float32 under autocast)."""
        precision = (
            nullcontext() if self.autocast is None else torch.autocast(input_ids.device.type, self.autocast)
        )
        with precision:
            out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden if self.autocast is None else hidden.float()


def max_subwords(transformer: nn.Module, tokenizer) -> int:
    """The encoder's input limit in subwords (special tokens included): its position
    embeddings' and its tokenizer's; 512 for a model with neither (relative positions, as T5)."""
    config = transformer.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in {"roberta", "xlm-roberta", "camembert", "longformer"}:
        limit -= int(config.pad_token_id) + 1  # positions start after the padding index
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max and model_max < 1_000_000:
        limit = min(limit, int(model_max)) if limit is not None else int(model_max)
    return int(limit) if limit is not None else 512


def float32_weights() -> dict[str, torch.dtype]:
    """``from_pretrained``'s keyword argument for float32 weights: ``dtype`` on transformers 5 (which
    otherwise keeps a checkpoint's precision, e5-small's float16), ``torch_dtype`` before."""
    return {"dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype": torch.float32}


def load_pretrained(name_or_path: str, attn_implementation: str | None = None) -> tuple[nn.Module, object]:
    """``AutoModel`` and fast ``AutoTokenizer`` from a hub name or a local folder, in float32."""
    kwargs = float32_weights()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        tokenizer_kwargs = {"add_prefix_space": True} if config.model_type in _PREFIX_SPACE_TYPES else {}
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
        if config.model_type in _ENCODER_ONLY:  # an encoder-decoder checkpoint: its encoder alone
            model = getattr(transformers, _ENCODER_ONLY[config.model_type]).from_pretrained(
                name_or_path, **kwargs
            )
        else:
            try:
                model = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)
            except TypeError:  # architectures without a pooler option
                model = AutoModel.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise OSError(
            f"could not load encoder {name_or_path!r} (model.name_or_path): {error}\n"
            "Use a local folder (e.g. ../shared/models/multilingual-e5-small) when the hub is unreachable."
        ) from error
    return model, tokenizer


def train_subword_tokenizer(
    texts: Iterable[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """A cased byte-pair-encoding tokenizer trained offline on ``texts``, with BERT's special
    tokens and ``[CLS] ... [SEP]`` framing; the same text always gives the same vocabulary.

    Word-internal pieces carry no ``##`` prefix: the trainers of ``tokenizers`` number such
    prefixed pieces in hash-map order and so break ties between merges differently from call
    to call (huggingface/tokenizers#1794), which would make runs with the same seed differ.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, in this order
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", specials.index("[CLS]")), ("[SEP]", specials.index("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


TINY_ARCHITECTURES = ("bert", "xlm-roberta", "modernbert", "mt5", "qwen2")


def build_tiny_transformer(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_length: int = 128,
    architecture: str = "bert",
    attn_implementation: str | None = None,
    seed: int = 0,
    pad_token_id: int = 0,
    num_kv_heads: int | None = None,
    cls_token_id: int = 2,
    sep_token_id: int = 3,
) -> nn.Module:
    """A small randomly initialised transformer, deterministic for ``seed``: a BERT or XLM-R
    style encoder, a ModernBERT, an mT5 encoder (gated-GELU feed-forward), or a Qwen2-style
    decoder with grouped-query attention (``num_kv_heads`` key-value heads; default: half the
    query heads). ``cls_token_id`` and ``sep_token_id`` are the tokenizer's framing tokens
    (beginning and end of a sequence for the decoder)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        pad_token_id=pad_token_id,
    )
    framing = dict(bos_token_id=cls_token_id, eos_token_id=sep_token_id)
    kwargs = {}
    if architecture == "bert":
        config = transformers.BertConfig(max_position_embeddings=max_length, **common)
        model_class, kwargs = transformers.BertModel, {"add_pooling_layer": False}
    elif architecture == "xlm-roberta":
        config = transformers.XLMRobertaConfig(
            max_position_embeddings=max_length + pad_token_id + 1, **common
        )
        model_class, kwargs = transformers.XLMRobertaModel, {"add_pooling_layer": False}
    elif architecture == "modernbert":
        config = transformers.ModernBertConfig(max_position_embeddings=max_length, cls_token_id=cls_token_id,
                                               sep_token_id=sep_token_id, **framing, **common)  # fmt: skip
        model_class = transformers.ModernBertModel
    elif architecture == "mt5":
        config = transformers.MT5Config(
            vocab_size=vocab_size, d_model=hidden_size, num_layers=num_layers, num_heads=num_heads,
            d_kv=hidden_size // num_heads, d_ff=intermediate_size, feed_forward_proj="gated-gelu",
            pad_token_id=pad_token_id, eos_token_id=sep_token_id, decoder_start_token_id=pad_token_id,
        )  # fmt: skip
        model_class = transformers.MT5EncoderModel
    elif architecture == "qwen2":
        config = transformers.Qwen2Config(max_position_embeddings=max_length, use_sliding_window=False,
                                          num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
                                          **framing, **common)  # fmt: skip
        model_class = transformers.Qwen2Model
    else:
        raise ValueError(
            f"model.tiny.architecture must be one of {', '.join(TINY_ARCHITECTURES)}, got {architecture!r}"
        )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config, **kwargs)
