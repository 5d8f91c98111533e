"""Subword alignment and batch collation.

In a bidirectional encoder each word is represented by its first subword, and word ``0`` of
every sentence, the artificial root, by the first window's ``[CLS]`` token. In a causal
decoder (a token sees only what precedes it) each word is represented by its last subword,
the first that has seen the whole word, and the root by the first window's final token
(``[SEP]``/``</s>``/EOS), the one that has seen the whole window. A sentence whose subwords do not fit
into the encoder's length limit is split into overlapping windows at word boundaries; each word
is read from the window in which it has the most context on both sides, so no word is ever
dropped (the evaluation denominator equals the number of words in the gold file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from subnets.data.labels import DEPREL_INDEX, UPOS_INDEX, universal_deprel
from subnets.data.treebank import Sentence

WordPieces = list[list[int]]  # subword ids of each word of a sentence
UNSPECIFIED = -100  # the UPOS index of '_': torch's cross-entropy ignores it


def encode_words(tokenizer, sentences: Sequence[Sentence], chunk: int = 512) -> list[WordPieces]:
    """Subword ids of every word of every sentence (no special tokens).

    Uses the fast tokenizer's ``word_ids`` on pre-split words, so the pieces are those the
    tokenizer produces in context. A word that yields no piece (a character the vocabulary
    drops) is given the unknown token, so that it still has a representation.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; word alignment needs word_ids()"
        )
    unk = tokenizer.unk_token_id
    encoded: list[WordPieces] = []
    for start in range(0, len(sentences), chunk):
        part = sentences[start : start + chunk]
        batch = tokenizer([s.forms for s in part], is_split_into_words=True, add_special_tokens=False)
        for row, sentence in enumerate(part):
            pieces: WordPieces = [[] for _ in sentence.forms]
            for piece, word in zip(batch["input_ids"][row], batch.word_ids(row)):
                if word is not None:
                    pieces[word].append(piece)
            encoded.append([p if p else [unk] for p in pieces])
    return encoded


def plan_windows(lengths: Sequence[int], budget: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Split words with ``lengths`` subwords into windows of at most ``budget`` subwords.

    Words longer than ``budget`` count as ``budget`` (only their first pieces are kept).
    Consecutive windows overlap by about half. Returns the windows as ``(start, end)`` word
    ranges and, for each word, the window it is read from: the one where its distance to the
    nearer window edge (an edge at the sentence boundary does not count) is largest.
    """
    lengths = [min(n, budget) for n in lengths]
    n = len(lengths)
    windows = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and used + lengths[end] <= budget:
            used += lengths[end]
            end += 1
        windows.append((start, end))
        if end == n:
            break
        start = max(start + 1, start + (end - start) // 2)
    inf = float("inf")
    owner = []
    for i in range(n):
        scores = [
            min(i - s if s > 0 else inf, e - 1 - i if e < n else inf) if s <= i < e else -1
            for s, e in windows
        ]
        owner.append(max(range(len(windows)), key=lambda w: (scores[w], -w)))
    return windows, owner


@dataclass
class Batch:
    """A batch of sentences of one language, for parsing and UPOS tagging.

    Word axis: position 0 is the root, positions ``1..n`` the words, then padding.

    Attributes:
        input_ids, attention_mask: ``[windows, T]`` subword input of the encoder.
        word_index: ``[B, 1 + W]`` index into the flattened ``[windows * T]`` encoder output of
            each word's representing subword (position 0: the root's token; module docstring).
        word_mask: ``[B, 1 + W]`` true at real words (not at the root nor padding).
        heads, deprels, upos: ``[B, 1 + W]`` gold annotation (0 where ``word_mask`` is false).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_index: torch.Tensor
    word_mask: torch.Tensor
    heads: torch.Tensor
    deprels: torch.Tensor
    upos: torch.Tensor
    examples: list[Sentence] = field(default_factory=list)
    lang: str = ""

    @property
    def num_words(self) -> int:
        return int(self.word_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return _moved(self, device)


@dataclass
class LabelledBatch:
    """A batch of one language for a word-level or example-level classifier: the encoder input
    and word positions as [Batch][subnets.data.batching.Batch] (for a sentence classifier, position 0 is the
    token that represents the example), and ``labels`` (``[B, 1 + W]`` per word or ``[B]`` per example;
    ``-100`` where nothing is scored). ``num_words`` counts the labels scored."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_index: torch.Tensor
    word_mask: torch.Tensor
    labels: torch.Tensor
    examples: list = field(default_factory=list)
    lang: str = ""

    @property
    def num_words(self) -> int:
        return int((self.labels != UNSPECIFIED).sum())

    def to(self, device: torch.device | str) -> LabelledBatch:
        return _moved(self, device)


def _moved(batch, device: torch.device | str):
    """A copy of a batch dataclass with its tensors on ``device``."""
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return type(batch)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


class WordCollator:
    """Frames the subword pieces of a batch's sentences for one encoder: windows, padding and
    the position each word (and the root) is read from (module docstring).

    Args:
        tokenizer: gives the special-token ids (``[CLS]``/``<s>``/BOS, ``[SEP]``/``</s>``/EOS,
            padding). A window is framed by the first and the last where the tokenizer has them.
        max_length: the encoder's limit in subwords, special tokens included.
        causal: the encoder is a causal decoder: words are read from their last subword and the
            root from the window's final token (module docstring); the opening token is then
            optional (Qwen's tokenizers have none), the final one required.
    """

    def __init__(self, tokenizer, max_length: int, causal: bool = False):
        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.causal = causal
        if self.sep_id is None or (self.cls_id is None and not causal):
            needed = "a sep or eos token" if causal else "cls/sep or bos/eos tokens"
            raise ValueError(
                f"{type(tokenizer).__name__} has no {needed}, which frame the words and represent the root"
            )
        self.framing = 1 + (self.cls_id is not None)
        if max_length < self.framing + 1:
            raise ValueError(f"max_length must leave room for at least one subword, got {max_length}")
        self.max_length = max_length

    def encode(self, pieces: Sequence[WordPieces]) -> tuple[torch.Tensor, ...]:
        """``input_ids``, ``attention_mask``, ``word_index`` and ``word_mask``
        ([Batch][subnets.data.batching.Batch])."""
        budget = self.max_length - self.framing
        opening = [] if self.cls_id is None else [self.cls_id]
        rows: list[list[int]] = []
        positions: list[list[tuple[int, int]]] = []  # per sentence: (row, token position) of root and words
        for word_pieces in pieces:
            windows, owner = plan_windows([len(p) for p in word_pieces], budget)
            first_row = len(rows)
            reads = {}  # (window, word) -> the position the word is read from
            for w, (s, e) in enumerate(windows):
                ids = list(opening)
                for i in range(s, e):
                    kept = word_pieces[i][:budget]
                    reads[(w, i)] = len(ids) + (len(kept) - 1 if self.causal else 0)
                    ids.extend(kept)
                if w == 0:
                    root = len(ids) if self.causal else 0
                rows.append(ids + [self.sep_id])
            positions.append(
                [(first_row, root)]
                + [(first_row + owner[i], reads[(owner[i], i)]) for i in range(len(word_pieces))]
            )
        input_ids, attention_mask = self.pad(rows)
        width = input_ids.shape[1]
        shape = (len(pieces), max(len(p) for p in pieces) + 1)
        word_index = torch.zeros(shape, dtype=torch.long)
        word_mask = torch.zeros(shape, dtype=torch.bool)
        for b, where in enumerate(positions):
            word_index[b, : len(where)] = torch.tensor([row * width + pos for row, pos in where])
            word_mask[b, 1 : len(where)] = True
        return input_ids, attention_mask, word_index, word_mask

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``rows`` padded to the longest."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
        return input_ids, attention_mask


class Collator(WordCollator):
    """Turns sentences and their word pieces into a parsing
    [Batch][subnets.data.batching.Batch] ([WordCollator][subnets.data.batching.WordCollator])."""

    def __call__(self, sentences: Sequence[Sentence], pieces: Sequence[WordPieces], lang: str = "") -> Batch:
        input_ids, attention_mask, word_index, word_mask = self.encode(pieces)
        heads, deprels, upos = (torch.zeros(word_mask.shape, dtype=torch.long) for _ in range(3))
        for b, sentence in enumerate(sentences):
            n = len(sentence)
            heads[b, 1 : n + 1] = torch.tensor(sentence.heads)
            deprels[b, 1 : n + 1] = torch.tensor(
                [DEPREL_INDEX[universal_deprel(d)] for d in sentence.deprels]
            )
            # an unspecified tag ('_') is ignored by the tagger's loss (cross-entropy's ignore_index)
            upos[b, 1 : n + 1] = torch.tensor([UPOS_INDEX.get(t, UNSPECIFIED) for t in sentence.upos])
        return Batch(
            input_ids, attention_mask, word_index, word_mask, heads, deprels, upos, list(sentences), lang
        )
