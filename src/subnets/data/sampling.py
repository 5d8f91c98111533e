"""Language-homogeneous batches with temperature-based sampling over languages."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def language_probabilities(sizes: Mapping[str, int], alpha: float) -> dict[str, float]:
    """``p(l) = n_l^alpha / sum_k n_k^alpha``: alpha=1 samples by size, alpha=0 uniformly."""
    if not sizes:
        raise ValueError("no languages to sample from")
    empty = [code for code, n in sizes.items() if n <= 0]
    if empty:
        raise ValueError(f"languages with no training sentences: {', '.join(empty)}")
    weights = {code: float(n) ** alpha for code, n in sizes.items()}
    total = sum(weights.values())
    return {code: w / total for code, w in weights.items()}


class LanguageSampler:
    """Draws a language with [language_probabilities][subnets.data.sampling.language_probabilities], then a
    batch of that language.

    Each language is walked through in a fresh random order every epoch; the sentences left at
    the end of an epoch start the next batch, so every sentence is seen once per epoch and a
    batch never holds a sentence twice. Fully determined by ``seed``; ``state_dict`` captures the
    position for an exact resume.

    Example::

        sampler = LanguageSampler({"en": 3000, "ko": 500}, batch_size=32, alpha=0.5, seed=1)
        lang, indices = sampler.next()   # indices into that language's sentence list
    """

    def __init__(self, sizes: Mapping[str, int], batch_size: int, alpha: float = 0.5, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        self.probabilities = language_probabilities(self.sizes, alpha)
        self.codes = list(self.sizes)
        self._p = np.array([self.probabilities[c] for c in self.codes])
        self._rng = np.random.default_rng(seed)
        self._queues: dict[str, list[int]] = {code: [] for code in self.codes}

    def next_language(self) -> str:
        return self.codes[int(self._rng.choice(len(self.codes), p=self._p))]

    def next_batch(self, code: str, size: int | None = None) -> list[int]:
        """The next ``size`` (default ``batch_size``) sentence indices of language ``code``
        (fewer if the language is smaller)."""
        size = min(size or self.batch_size, self.sizes[code])
        queue = self._queues[code]
        if len(queue) < size:
            # a new epoch; the leftovers of the last one go to its end, so a batch never repeats a sentence
            waiting = set(queue)
            order = [int(i) for i in self._rng.permutation(self.sizes[code])]
            queue = queue + [i for i in order if i not in waiting] + [i for i in order if i in waiting]
        batch, self._queues[code] = queue[:size], queue[size:]
        return batch

    def next(self) -> tuple[str, list[int]]:
        code = self.next_language()
        return code, self.next_batch(code)

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "queues": {c: list(q) for c, q in self._queues.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["queues"]) != set(self.codes):
            raise ValueError(
                f"sampler state is for languages {sorted(state['queues'])}, not {sorted(self.codes)}"
            )
        self._rng.bit_generator.state = state["rng"]
        self._queues = {c: list(q) for c, q in state["queues"].items()}
