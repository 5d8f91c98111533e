"""Activation-selected language neurons (``masks.importance=activation``): LAPE, language
activation probability entropy (Tang et al. 2024, "Language-Specific Neurons: The Key to
Multilingual Capabilities in Large Language Models"), as an importance source for feed-forward
neurons.

The activation probability of neuron ``j`` of layer ``i`` in language ``l`` is the share of the
language's tokens (padding excluded) on which the neuron's activation is positive::

    p[l, i, j] = #{tokens of l with a[i, j] > 0} / #{tokens of l}

measured in forward passes without gradient over the language's text (the static search's
importance batches), on the model as it is, ungated. Each neuron's probabilities, normalised
over the L languages, have the entropy::

    q[l] = p[l] / sum over l' of p[l'],    H[i, j] = - sum over l of q[l] log q[l]

0 for a neuron one language alone activates, ``log L`` for one all languages activate
equally often (and for one none activates). A language's subnetwork holds its lowest-entropy
neurons among those it activates often: whose probability ``p[l]`` exceeds the bar, the
``quantile`` of all the probabilities (every language, layer and neuron; LAPE's 95th
percentile, ``masks.activation_quantile=0.95``). A quantile rather than a fixed floor, as LAPE
has it: a floor such as 0.01 lets a language claim neurons another language activates almost
alone (probabilities 0.02 and 0.9 have an entropy near 0), and what a probability means
depends on the model's activation and depth; the 95th percentile keeps the neurons the
language activates among the most often of all.

How many neurons a language keeps is not LAPE's (its lowest 1% of entropies) but the usual
selection's (``masks.selection``, ``keep_ratio``, ``top_k``, ``min_heads_per_layer``), so that
budgets match the other importance sources: [activation_scores][subnets.masks.activation.activation_scores]
ranks the neurons in one score in [0, 1] that the selection takes::

    score[l] = 0.5 + 0.5 (1 - H / log L)   where p[l] > bar   (lowest entropy first)
               0.5 p[l]                    elsewhere          (then the most often active)

A budget larger than the neurons above the bar is filled with the language's most often
active other neurons, never with neurons it rarely activates while another language does
(low entropy, but not its own). The scores are measured once: iterative pruning
(``masks.selection=iterative``) removes the lowest-scoring neurons without re-scoring, and
``masks.finetune_steps`` is not used (every language's probabilities come from the same model,
or their entropies would compare different models).

Which activation. The activation is read where the library gates neurons: the input of each
layer's feed-forward output projection, at the forward pre-hook of
[UnitGates][subnets.models.gates.UnitGates]. For a plain feed-forward block (BERT, XLM-R, e5,
T5) that is ``act(W_in x)``, positive exactly where LAPE's criterion holds (GELU and ReLU are
positive where their input is). For a gated block (Llama, Qwen2, Gemma, mT5) it is
``act(gate_proj x) * up_proj x``, where LAPE used ``act(gate_proj x)`` alone: a neuron then
counts as active where the product is positive, i.e. where it adds its output column with a
positive weight. The product is used because it is what the gate multiplies and what the
neuron writes, and because every layout the library knows exposes it at the same point, so
that one measurement runs on every family without a hook of its own on the activation function.

Attention heads have no such activation: the runner refuses ``masks.importance=activation``
with ``masks.units=heads`` or ``both`` (``subnets.training.assemble.check_method_settings``).

Example (any Hugging Face model)::

    gates = NeuronGates(hf_model)
    neurons = language_neurons(hf_model, {"de": de_batches, "fi": fi_batches}, gates=gates,
                               run=lambda b: hf_model(**b), token_mask=lambda b: b["attention_mask"])
    mask = select_keep_ratio(neurons.scores["de"], 0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from subnets.models.gates import UnitGates

Counts = list[tuple[torch.Tensor, torch.Tensor]]  # per batch: ([layers, neurons] positive, [layers] tokens)


def _token_mask(batch) -> torch.Tensor | None:
    mask = (
        batch.get("attention_mask") if isinstance(batch, Mapping) else getattr(batch, "attention_mask", None)
    )
    return None if mask is None else mask.bool()


def activation_counts(
    model: nn.Module,
    batches: Iterable,
    *,
    gates: UnitGates | None = None,
    run: Callable[[object], object] | None = None,
    token_mask: Callable[[object], torch.Tensor | None] | None = None,
) -> Counts:
    """Per batch, the tokens on which each feed-forward neuron's activation is positive
    (``[layers, neurons]``) and the tokens seen (``[layers]``), on the CPU: what
    [activation_probabilities][subnets.masks.activation.activation_probabilities] divides.

    Args:
        model: the model (in eval mode, without gradient and without gates while measured;
            its mode and gates are restored).
        batches: the batches of one language.
        gates: the model's [UnitGates][subnets.models.gates.UnitGates] (default: ``model.gates``);
            they must cover neurons, whose output projections are read.
        run: batch -> the forward pass (default: ``model(batch)``).
        token_mask: batch -> ``[batch, tokens]``, true for the tokens that count (default: the
            batch's ``attention_mask``, attribute or key; all tokens where it has none).
    """
    gates = gates or model.gates
    if "neurons" not in gates.units:
        raise ValueError(f"activation probabilities are measured on feed-forward neurons; these gates cover "
                         f"{' and '.join(gates.units)} (gate units='neurons')")  # fmt: skip
    run = run or model
    token_mask = token_mask or _token_mask
    outputs, count = gates.outputs["neurons"], gates.units["neurons"]
    depths: dict[nn.Module, list[int]] = {}
    for depth, output in enumerate(outputs):  # a layer shared by several depths runs depth after depth
        depths.setdefault(output, []).append(depth)
    state: dict = {}

    def measure(module: nn.Module, args: tuple) -> None:
        calls = state["calls"].get(module, 0)
        state["calls"][module] = calls + 1
        depth = depths[module][calls % len(depths[module])]
        active, mask = args[0] > 0, state["mask"]
        if mask is not None and tuple(active.shape[:-1]) == tuple(mask.shape):
            active, tokens = active & mask[..., None], mask.sum()
        elif mask is None or active[..., 0].numel() == int(mask.sum()):  # no mask, or a packed batch
            tokens = active[..., 0].numel()
        else:
            raise ValueError(f"the feed-forward output projection at depth {depth} sees input of shape "
                             f"{tuple(active.shape)}, which the token mask {tuple(mask.shape)} does not fit")  # fmt: skip
        state["positive"][depth] += active.reshape(-1, count).sum(dim=0).cpu()
        state["tokens"][depth] += int(tokens)

    handles = [output.register_forward_pre_hook(measure) for output in depths]
    was_training = model.training
    model.eval()
    found: Counts = []
    try:
        with torch.no_grad(), gates.applied(None):
            for batch in batches:
                mask = token_mask(batch)
                state.update(calls={}, mask=mask, positive=torch.zeros(len(outputs), count, dtype=torch.float64),
                             tokens=torch.zeros(len(outputs), dtype=torch.float64))  # fmt: skip
                run(batch)
                found.append((state["positive"], state["tokens"]))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


def probabilities_of(counts: Counts) -> torch.Tensor:
    """``[layers, neurons]``: the share of the tokens of ``counts``
    ([activation_counts][subnets.masks.activation.activation_counts]) on which each neuron is active."""
    positive = sum(c[0] for c in counts)
    tokens = sum(c[1] for c in counts)
    return (positive / tokens.clamp(min=1)[:, None]).float()


def activation_probabilities(model: nn.Module, batches: Iterable, **kwargs) -> torch.Tensor:
    """``[layers, neurons]``: each feed-forward neuron's activation probability, the share of the
    tokens of ``batches`` (padding excluded) on which its activation is positive (module
    docstring: which activation). ``kwargs``: those of
    [activation_counts][subnets.masks.activation.activation_counts]."""
    return probabilities_of(activation_counts(model, batches, **kwargs))


def language_entropy(probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[layers, neurons]``: the entropy (nats) of each neuron's activation probabilities
    (language -> ``[layers, neurons]``) normalised over the languages; ``log L`` for a neuron
    no language activates."""
    stacked = torch.stack(list(probabilities.values())).double()
    total = stacked.sum(dim=0, keepdim=True)
    share = torch.where(total > 0, stacked / total.clamp(min=1e-300), torch.zeros_like(stacked))
    terms = torch.where(share > 0, share * share.clamp(min=1e-300).log(), torch.zeros_like(share))
    entropy = -terms.sum(dim=0)
    return torch.where(total[0] > 0, entropy, torch.full_like(entropy, math.log(len(probabilities)))).float()


def activation_bar(probabilities: Mapping[str, torch.Tensor], quantile: float = 0.95) -> float:
    """The ``quantile`` of all the probabilities (every language, layer and neuron), the
    ``round(quantile * n)``-th smallest of the ``n`` as in LAPE (the smallest for 0)."""
    values = torch.cat([p.flatten() for p in probabilities.values()]).double()
    k = min(max(1, round(quantile * values.numel())), values.numel())
    return float(values.kthvalue(k).values)


def activation_scores(
    probabilities: Mapping[str, torch.Tensor], quantile: float = 0.95
) -> dict[str, torch.Tensor]:
    """Each language's neuron scores in [0, 1] (module docstring): ``0.5 + 0.5 (1 - H / log L)``
    for the neurons whose probability exceeds [activation_bar][subnets.masks.activation.activation_bar],
    ``0.5 p`` for the others; the highest first is the lowest entropy among those above the bar.
    With one language every neuron above the bar is equally specific (1)."""
    entropy = language_entropy(probabilities)
    languages = len(probabilities)
    specific = (1 - entropy / math.log(languages)).clamp(0, 1) if languages > 1 else torch.ones_like(entropy)
    bar = activation_bar(probabilities, quantile)
    return {lang: torch.where(p > bar, 0.5 + 0.5 * specific, 0.5 * p) for lang, p in probabilities.items()}


@dataclass
class LanguageNeurons:
    """What [language_neurons][subnets.masks.activation.language_neurons] measured: per language its
    activation probabilities and scores (``[layers, neurons]``) and, with ``split_half``, the
    scores from its even and its odd batches alone (each half's scores against the other
    languages' same half), for [split_half_agreement][subnets.masks.controls.split_half_agreement]."""

    probabilities: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    entropy: torch.Tensor
    bar: float
    halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def language_neurons(
    model: nn.Module,
    batches: Mapping[str, Sequence],
    quantile: float = 0.95,
    *,
    split_half: bool = False,
    **kwargs,
) -> LanguageNeurons:
    """Every language's activation probabilities and neuron scores (the languages are compared,
    so all are measured together), from one forward pass per batch.

    Args:
        batches: language -> its batches.
        quantile: the bar's quantile ([activation_bar][subnets.masks.activation.activation_bar]).
        split_half: also score the even and the odd batches apart (languages with two batches or more).
        kwargs: those of [activation_counts][subnets.masks.activation.activation_counts].
    """
    counts = {lang: activation_counts(model, b, **kwargs) for lang, b in batches.items()}
    probabilities = {lang: probabilities_of(c) for lang, c in counts.items()}
    halves = {}
    if split_half and counts and all(len(c) >= 2 for c in counts.values()):
        even = activation_scores({lang: probabilities_of(c[0::2]) for lang, c in counts.items()}, quantile)
        odd = activation_scores({lang: probabilities_of(c[1::2]) for lang, c in counts.items()}, quantile)
        halves = {lang: (even[lang], odd[lang]) for lang in counts}
    return LanguageNeurons(probabilities, activation_scores(probabilities, quantile),
                           language_entropy(probabilities), activation_bar(probabilities, quantile), halves)  # fmt: skip
