"""Building the model a config describes: the encoder (the built-in tiny BERT or any Hugging Face
checkpoint) and the task's model on top of it
([subnets.tasks.Task.build_model][subnets.tasks.base.Task.build_model]).

Example (what the runner and the benchmarks do)::

    cfg = compose_config(["model=e5_small"])
    transformer, tokenizer = build_encoder(cfg.model, seed=cfg.seed)
    model = build_model(cfg.model, transformer, Parsing())
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnets.models.encoder import Encoder, build_tiny_transformer, load_pretrained, train_subword_tokenizer


def build_encoder(
    model: Any,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    tokenizer_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """The transformer and its tokenizer for ``model`` (the ``model.*`` settings).

    ``model.name_or_path="tiny"`` builds the random tiny transformer (``model.tiny.*``, weights
    deterministic for ``seed``) with a byte-pair tokenizer trained on ``texts``, or loaded from
    ``tokenizer_folder`` if it holds one (a resumed run), and saved there otherwise. Anything
    else is loaded with ``AutoModel``/``AutoTokenizer`` (a hub name or a local folder).
    """
    if model.name_or_path != "tiny":
        return load_pretrained(model.name_or_path, model.attn_implementation)
    from transformers import PreTrainedTokenizerFast

    tiny = model.tiny
    folder = Path(tokenizer_folder) if tokenizer_folder is not None else None
    if folder is not None and (folder / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        if texts is None:
            raise ValueError("the tiny model's tokenizer is trained on the training text: pass texts")
        tokenizer = train_subword_tokenizer(texts, tiny.vocab_size, tiny.max_length)
        if folder is not None:
            tokenizer.save_pretrained(folder)
    transformer = build_tiny_transformer(
        len(tokenizer), tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.intermediate_size,
        tiny.max_length, tiny.architecture, model.attn_implementation, seed, tokenizer.pad_token_id,
        tiny.num_kv_heads, tokenizer.cls_token_id, tokenizer.sep_token_id,
    )  # fmt: skip
    return transformer, tokenizer


def build_model(
    model: Any,
    transformer: nn.Module,
    task: Any,
    tokenizer: Any = None,
    *,
    precision: str = "fp32",
    units: str = "heads",
) -> nn.Module:
    """The model of ``task`` (a [Task][subnets.tasks.Task], which first checks that it fits the
    model and its ``tokenizer``) on ``transformer``, wrapped as an [Encoder][subnets.models.encoder.Encoder]
    with the ``model.*`` settings ``model``: a scalar mix with ``model.mix_dropout``; every dropout
    inside it set to ``model.encoder_dropout`` when given; its word embeddings frozen with
    ``model.freeze_embeddings`` (``requires_grad=False``, so no optimizer holds them); gates on
    ``units`` (``masks.units``: heads, neurons or both), found by ``model.layout`` or the detected
    layout. ``precision`` (``train.precision``): ``bf16`` runs it under bfloat16 autocast, ``bf16_base``
    also stores the transformer's weights in bfloat16, ``fp64`` makes it float64."""
    if model.freeze_embeddings:
        transformer.get_input_embeddings().weight.requires_grad_(False)
    if model.encoder_dropout is not None:
        for module in transformer.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = model.encoder_dropout
    if precision == "bf16_base":
        transformer.to(torch.bfloat16)
    autocast = torch.bfloat16 if precision.startswith("bf16") else None
    encoder = Encoder(transformer, model.mix_dropout, autocast, units=units, layout=model.layout)
    task.use_model(transformer, tokenizer, encoder.gates.layout.causal)
    built = task.build_model(encoder)
    return built.double() if precision == "fp64" else built
