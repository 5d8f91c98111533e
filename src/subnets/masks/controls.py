"""Controls for masks: random masks, their chance level, and split-half reliability.

* [random_unit_mask][subnets.masks.controls.random_unit_mask] /
  [random_like][subnets.masks.controls.random_like]: masks with given per-layer unit counts (and per-tensor
  parameter counts) whose members are drawn uniformly, from a generator seeded by a seed and a name (no global
  random state is used or changed).
* [expected_random_jaccard][subnets.masks.controls.expected_random_jaccard]: the exact expected Jaccard
  overlap of two independent random masks with given per-layer counts: the chance level a pair of real masks
  is compared with.

In layer ``l`` with ``n`` heads, two random masks of ``a_l`` and ``b_l`` heads share
``I_l ~ Hypergeometric(n, a_l, b_l)`` heads, independently across layers, so with
``A = sum a_l``, ``B = sum b_l`` and ``I = sum I_l``::

    E[J] = sum_i P(I = i) * i / (A + B - i)

(``P(I = i)`` is the convolution of the layers' hypergeometric distributions).

* [split_half_agreement][subnets.masks.controls.split_half_agreement]: how reliable a mask is: the masks
  selected from importance measured on two disjoint halves of the data, with the mask's own per-layer counts,
  compared by Jaccard (against the chance level above) and the two score maps by Spearman correlation.

With several kinds of unit (heads and neurons), counts are kept per layer and per kind: each
(layer, kind) block plays the part of a layer above.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from subnets.masks.selection import Units, per_kind
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet


def generator(seed: int, name: str) -> np.random.Generator:
    """A numpy generator seeded by ``seed`` and ``name`` (e.g. ``random/<language>``)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_unit_mask(counts: Sequence[int], units: int, rng: np.random.Generator) -> torch.Tensor:
    """Boolean ``[layers, units]`` mask with ``counts[l]`` units in layer ``l``, drawn uniformly."""
    mask = torch.zeros(len(counts), units, dtype=torch.bool)
    for layer, count in enumerate(counts):
        if not 0 <= count <= units:
            raise ValueError(f"layer {layer}: {count} units asked of {units}")
        mask[layer, torch.from_numpy(rng.permutation(units)[:count])] = True
    return mask


def random_mask_like(
    mask: torch.Tensor, rng: np.random.Generator, units: Units | None = None
) -> torch.Tensor:
    """A random mask with ``mask``'s count in every layer and kind of unit (a float ``mask``,
    e.g. the mean of several masks, gives the rounded counts)."""
    return per_kind(lambda block, columns: random_unit_mask([int(round(float(c))) for c in block.sum(dim=1)],
                                                         block.shape[1], rng), mask, units)  # fmt: skip


def random_like(masks: SubnetworkSet, seed: int) -> SubnetworkSet:
    """For every language, a random subnetwork with its unit counts in every layer (and kind)
    and its number of kept coordinates in every parameter mask (generator: ``seed``,
    ``random/<lang>``)."""
    randomized = SubnetworkSet(masks.num_layers, masks.units, masks.param_shapes)
    for lang, subnetwork in masks.items():
        rng = generator(seed, f"random/{lang}")
        unit_mask = random_mask_like(subnetwork.unit_mask, rng, masks.units)
        params = {}
        for name, mask in subnetwork.param_masks.items():
            flat = torch.zeros(mask.numel(), dtype=torch.bool)
            flat[torch.from_numpy(rng.permutation(mask.numel())[: int(mask.sum())])] = True
            params[name] = flat.view(mask.shape)
        randomized[lang] = Subnetwork(unit_mask, params)
    return randomized


def _hypergeometric(n: int, a: int, b: int) -> np.ndarray:
    """P(I = i), i = 0..min(a, b), for the overlap of random subsets of sizes a and b of n items."""
    from scipy.stats import hypergeom  # scipy.stats costs most of a second at import: only where used

    return hypergeom.pmf(np.arange(min(a, b) + 1), n, a, b)


def expected_random_jaccard(
    counts_a: Sequence[int], counts_b: Sequence[int], units: int | Sequence[int]
) -> float:
    """The exact expected Jaccard overlap of two independent random unit masks with per-layer
    counts ``counts_a`` and ``counts_b`` among ``units`` per layer (a number, or one per layer)
    (module docstring)."""
    sizes = [units] * len(counts_a) if isinstance(units, int) else list(units)
    distribution = np.ones(1)
    for n, a, b in zip(sizes, counts_a, counts_b):
        distribution = np.convolve(distribution, _hypergeometric(int(n), int(a), int(b)))
    total = sum(counts_a) + sum(counts_b)
    overlap = np.arange(len(distribution))
    union = total - overlap
    ratios = np.divide(overlap, union, out=np.ones(len(overlap)), where=union > 0)
    return float((distribution * ratios).sum())


def block_counts(mask: torch.Tensor, units: Units | None = None) -> tuple[list[int], list[int]]:
    """The kept units and the units of every (layer, kind) block of ``mask``: the counts and
    sizes [expected_random_jaccard][subnets.masks.controls.expected_random_jaccard] takes."""
    counts, sizes = [], []

    def collect(block: torch.Tensor, columns: slice) -> torch.Tensor:
        counts.extend(int(c) for c in block.sum(dim=1))
        sizes.extend([block.shape[1]] * block.shape[0])
        return block

    per_kind(collect, mask, units)
    return counts, sizes


def chance_jaccard(a: torch.Tensor, b: torch.Tensor, units: Units | None = None) -> float:
    """The Jaccard overlap that random masks with the counts of ``a`` and ``b`` (per layer and
    kind) have on average."""
    (counts_a, sizes), (counts_b, _) = block_counts(a, units), block_counts(b, units)
    return expected_random_jaccard(counts_a, counts_b, sizes)


def random_jaccard_matrix(masks: SubnetworkSet) -> tuple[list[str], np.ndarray]:
    """Languages and the matrix of
    [expected_random_jaccard][subnets.masks.controls.expected_random_jaccard] for each pair's unit counts (the
    chance level of [SubnetworkSet.jaccard][subnets.masks.subnetwork.SubnetworkSet.jaccard])."""
    languages = list(masks)
    matrix = np.zeros((len(languages), len(languages)))
    for i, a in enumerate(languages):
        for j in range(i, len(languages)):  # symmetric
            b = languages[j]
            matrix[i, j] = matrix[j, i] = chance_jaccard(masks[a].unit_mask, masks[b].unit_mask, masks.units)
    return languages, matrix


def top_per_layer(scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Boolean mask of the ``counts[l]`` highest-scoring units of each layer ``l`` (ties by position)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for layer, count in enumerate(counts):
        order = torch.sort(-scores[layer].double(), stable=True).indices
        mask[layer, order[: int(count)]] = True
    return mask


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two boolean masks (1 for two empty masks)."""
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else 1.0


def split_half_agreement(
    halves: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, units: Units | None = None
) -> dict[str, float]:
    """Reliability of ``mask`` from unit importance measured on two disjoint halves of the data:
    ``jaccard`` of the masks each half selects with ``mask``'s per-layer (and per-kind) counts,
    the chance level ``random_jaccard`` of those counts
    ([expected_random_jaccard][subnets.masks.controls.expected_random_jaccard]), and the ``spearman``
    correlation of the two halves' scores (1 for identical halves)."""
    from scipy.stats import spearmanr

    def select(half: torch.Tensor) -> torch.Tensor:
        return per_kind(
            lambda block, columns: top_per_layer(block, mask[:, columns].sum(dim=1).tolist()), half, units
        )

    first, second = select(halves[0]), select(halves[1])
    a, b = (h.flatten().double().numpy() for h in halves)
    rho = 1.0 if np.array_equal(a, b) else float(spearmanr(a, b).statistic)
    return {
        "jaccard": jaccard(first, second),
        "random_jaccard": chance_jaccard(mask, mask, units),
        "spearman": rho,
    }
