"""Language-model heads on an [Encoder][subnets.models.encoder.Encoder]: masked (encoders) and
causal (decoders), for finding language-specific units from raw text.

The output embedding is the model's own: tied to the input embeddings where the model ties
them (BERT, XLM-R, multilingual-e5, many small decoders, the tiny models), else the
checkpoint's ``lm_head.weight``. BERT's masked-LM transform (dense, GELU, LayerNorm) and output
bias are loaded from the checkpoint where it holds them (a ``*ForMaskedLM`` checkpoint:
``cls.predictions.*`` or ``lm_head.*``); otherwise they start fresh, with a warning.

Masking follows transformers' ``DataCollatorForLanguageModeling``: each token but the special
ones is chosen with probability ``mlm_probability``; of those, 80% become ``[MASK]``, 10% a
random token, 10% stay, and only the chosen ones are predicted. In training the choice draws
from torch's global generator (like dropout: a resumed run draws the same); in eval mode from a
generator seeded by the batch's example ids, so an evaluation (and importance, which runs in
eval mode) sees the same masks every time.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from subnets.models.heads import TaskModel, TaskOutput

log = logging.getLogger(__name__)


def mask_tokens(
    input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(inputs, labels)`` of masked language modelling, drawn in the order
    ``DataCollatorForLanguageModeling.torch_mask_tokens`` draws them (so the same generator gives
    the same masks): labels are -100 but at the chosen tokens; ``special`` marks tokens never chosen."""
    inputs, labels = input_ids.clone(), input_ids.clone()
    chance = torch.full(labels.shape, probability).masked_fill_(special.cpu(), 0.0)
    chosen = torch.bernoulli(chance, generator=generator).bool()
    labels[~chosen.to(labels.device)] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8), generator=generator).bool() & chosen
    inputs[replaced.to(inputs.device)] = mask_id
    randomised = (
        torch.bernoulli(torch.full(labels.shape, 0.5), generator=generator).bool() & chosen & ~replaced
    )
    words = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator)
    inputs[randomised.to(inputs.device)] = words[randomised].to(inputs.device)
    return inputs, labels


class LanguageModel(TaskModel):
    """Masked (``objective="masked"``) or causal (``"causal"``) language modelling (module docstring).

    ``model(batch)``: the mean cross-entropy of the predicted tokens (``num_words`` of them for
    a causal model; about ``mlm_probability`` of ``num_words`` for a masked one).
    ``model.predict(batch)``: per example ``(summed negative log-likelihood, tokens predicted,
    tokens right)``.
    """

    def __init__(self, encoder: nn.Module, objective: str, vocab_size: int, mask_id: int | None = None,
                 mlm_probability: float = 0.15, source: str | None = None):  # fmt: skip
        super().__init__()
        self.encoder, self.objective = encoder, objective
        self.vocab_size, self.mask_id, self.mlm_probability = vocab_size, mask_id, mlm_probability
        hidden = encoder.hidden_size
        embeddings = encoder.transformer.get_input_embeddings().weight
        if objective == "masked":
            self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.bias = nn.Parameter(torch.zeros(embeddings.shape[0]))
        self.decoder_weight = None  # None: tied to the input embeddings
        config = encoder.transformer.config
        if source and not getattr(config, "tie_word_embeddings", True):  # a tiny model ties them by design
            weight = checkpoint_tensors(source, ["lm_head.weight"]).get("lm_head.weight")
            if weight is None:
                log.warning("%s does not tie its output embeddings and no lm_head.weight was found in its checkpoint: "
                            "the language-model head is tied to the input embeddings", source)  # fmt: skip
            else:
                self.decoder_weight = nn.Parameter(weight.to(embeddings.dtype))
        if objective == "masked":
            self._load_transform(source)

    def _load_transform(self, source: str | None) -> None:
        for prefix, norm in (("cls.predictions.transform.", "LayerNorm"), ("lm_head.", "layer_norm")):
            names = {"0.weight": "dense.weight", "0.bias": "dense.bias", "2.weight": f"{norm}.weight",
                     "2.bias": f"{norm}.bias"}  # fmt: skip
            found = checkpoint_tensors(source, [prefix + n for n in names.values()])
            if len(found) == len(names):
                with torch.no_grad():
                    for own, theirs in names.items():
                        self.transform.get_parameter(own).copy_(found[prefix + theirs])
                bias = checkpoint_tensors(source, [prefix.replace("transform.", "") + "bias"])
                for value in bias.values():
                    self.bias.data.copy_(value)
                return
        if source:  # a pretrained model (the tiny ones start fresh everywhere)
            log.warning(
                "%s holds no masked-LM head (cls.predictions.* or lm_head.*): its transform starts fresh",
                source,
            )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.objective == "masked":
            hidden = self.transform(hidden)
        weight = (
            self.decoder_weight
            if self.decoder_weight is not None
            else self.encoder.transformer.get_input_embeddings().weight
        )
        return hidden @ weight.t() + self.bias

    def inputs_and_labels(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The input ids the model sees and the labels of the tokens it predicts (-100 elsewhere)."""
        if self.objective == "causal":
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            return batch.input_ids, torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        generator = None
        if not self.training:
            generator = torch.Generator().manual_seed(
                zlib.crc32("\n".join(e.sent_id for e in batch.examples).encode())
            )
        return mask_tokens(
            batch.input_ids, batch.special, self.mask_id, self.vocab_size, self.mlm_probability, generator
        )

    def _predicted(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits and labels of the predicted tokens only (``[predicted, vocabulary]`` and
        ``[predicted]``), and the ``[batch, tokens]`` mask of where they are. The output layer runs
        on those tokens alone: a masked LM predicts 15% of them, and a multilingual vocabulary
        (e5-small's 250k words) makes that layer most of a step."""
        inputs, labels = self.inputs_and_labels(batch)
        hidden = self.encoder.tokens(inputs, batch.attention_mask)
        predicted = labels != -100
        return self.logits(hidden[predicted]), labels[predicted], predicted

    def forward(self, batch) -> TaskOutput:
        logits, labels, _ = self._predicted(batch)
        # nothing masked in a small batch: no loss, not 0/0 = NaN
        loss = logits.sum() * 0.0 if labels.numel() == 0 else F.cross_entropy(logits, labels)
        return TaskOutput(loss, {"lm": loss.detach()})

    @torch.no_grad()
    def predict(self, batch) -> list[tuple[float, int, int]]:
        logits, labels, predicted = self._predicted(batch)
        nll = F.cross_entropy(logits, labels, reduction="none").double()
        right = (logits.argmax(-1) == labels).long()
        example = predicted.nonzero()[:, 0]  # the example of each predicted token, in order
        size = predicted.shape[0]
        summed = torch.zeros(size, dtype=torch.float64, device=nll.device).index_add_(0, example, nll)
        correct = torch.zeros(size, dtype=torch.long, device=nll.device).index_add_(0, example, right)
        counts = predicted.sum(dim=1)
        return [(float(summed[b]), int(counts[b]), int(correct[b])) for b in range(size)]

    def sentence_representations(self, batch) -> torch.Tensor:
        hidden = self.encoder.tokens(batch.input_ids, batch.attention_mask)
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def checkpoint_tensors(source: str | None, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of a local Hugging Face checkpoint folder (``model.safetensors``,
    or the shards its index lists) that it holds; empty for no folder or none of them."""
    if not source or not Path(source).is_dir():
        return {}
    from safetensors import safe_open

    folder = Path(source)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
        files = {name: folder / where[name] for name in names if name in where}
    else:
        single = folder / "model.safetensors"
        if not single.exists():
            return {}
        with safe_open(str(single), framework="pt") as f:
            keys = set(f.keys())
        files = {name: single for name in names if name in keys}
    out = {}
    for name, file in files.items():
        with safe_open(str(file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out
