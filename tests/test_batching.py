"""Subword alignment, windows for long sentences, and collation."""

import pytest
import torch

from subnets.data.batching import Collator, encode_words, plan_windows
from subnets.data.treebank import Sentence
from subnets.models.encoder import train_subword_tokenizer

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a dog sleeps under the old tree",
    "foxes and dogs are animals",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_subword_tokenizer(TEXT, vocab_size=60, max_length=64)


def sentence(words):
    n = len(words)
    heads = [0] + [1] * (n - 1)
    return Sentence("s", list(words), ["NOUN"] * n, heads, ["root"] + ["dep"] * (n - 1))


def test_first_subword_alignment_matches_running_text(tokenizer):
    words = ["foxes", "sleeping", "under", "brownish", "trees"]
    pieces = encode_words(tokenizer, [sentence(words)])[0]
    assert len(pieces) == len(words)
    assert any(len(p) > 1 for p in pieces)  # the small vocabulary splits some words
    running = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert [i for p in pieces for i in p] == running
    for word, word_pieces in zip(words, pieces):
        assert "".join(tokenizer.convert_ids_to_tokens(word_pieces)) == word  # in order, nothing lost


def test_tokenizer_training_is_deterministic():
    # huggingface/tokenizers#1794: the WordPiece trainer breaks merge ties in hash-map order;
    # on this text it gave two different vocabularies within 200 trainings.
    first = train_subword_tokenizer(TEXT, vocab_size=60, max_length=64)
    for _ in range(200):
        again = train_subword_tokenizer(TEXT, vocab_size=60, max_length=64)
        assert again.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()


def test_word_without_pieces_gets_unknown_token(tokenizer):
    pieces = encode_words(tokenizer, [sentence(["dog", "\u200b"])])[0]  # zero-width space: no pieces
    assert pieces[1] == [tokenizer.unk_token_id]


def test_plan_windows_single_window_when_it_fits():
    windows, owner = plan_windows([1, 2, 3], budget=6)
    assert windows == [(0, 3)] and owner == [0, 0, 0]


@pytest.mark.parametrize(
    "lengths,budget", [([1] * 30, 8), ([3, 1, 2, 5, 1, 1, 4, 2, 2, 3, 1, 1] * 3, 7), ([9, 1, 9], 4)]
)
def test_plan_windows_covers_every_word_within_budget(lengths, budget):
    windows, owner = plan_windows(lengths, budget)
    assert windows[0][0] == 0 and windows[-1][1] == len(lengths)
    for start, end in windows:
        assert end > start
        assert sum(min(n, budget) for n in lengths[start:end]) <= budget
    for word, window in enumerate(owner):
        start, end = windows[window]
        assert start <= word < end
    for (s1, e1), (s2, _) in zip(windows, windows[1:]):
        assert s1 < s2 <= e1  # consecutive windows overlap or touch, and advance


def test_plan_windows_reads_each_word_where_it_has_most_context():
    windows, owner = plan_windows([1] * 20, budget=8)
    # a word in the middle of the sentence is never read at the edge of a window when another
    # window gives it context on both sides
    for word in range(4, 16):
        start, end = windows[owner[word]]
        assert min(word - start, end - 1 - word) >= 2


def test_collator_indexes_first_subwords_and_root(tokenizer):
    sentences = [sentence(["the", "foxes", "jumps"]), sentence(["a", "lazy", "dog", "sleeps", "brownish"])]
    pieces = encode_words(tokenizer, sentences)
    batch = Collator(tokenizer, max_length=64)(sentences, pieces, "xx")
    flat = batch.input_ids.flatten()
    assert batch.input_ids.shape[0] == 2  # one window each
    assert batch.word_index.shape == (2, 6)
    for b, sent_pieces in enumerate(pieces):
        assert flat[batch.word_index[b, 0]] == tokenizer.cls_token_id
        for j, word_pieces in enumerate(sent_pieces, start=1):
            assert flat[batch.word_index[b, j]] == word_pieces[0]
    assert batch.word_mask.tolist() == [[False, True, True, True, False, False], [False] + [True] * 5]
    assert batch.heads[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch.num_words == 8
    assert batch.attention_mask.sum().item() == sum(len(p) for s in pieces for p in s) + 4


def test_long_sentence_is_split_into_windows_without_losing_words(tokenizer):
    words = (TEXT[0].split() + TEXT[1].split()) * 4  # 64 words, more subwords than the limit
    pieces = encode_words(tokenizer, [sentence(words)])
    collator = Collator(tokenizer, max_length=16)
    batch = collator([sentence(words)], pieces)
    assert batch.input_ids.shape[0] > 4 and batch.input_ids.shape[1] <= 16
    flat = batch.input_ids.flatten()
    assert batch.word_mask.sum() == len(words)
    for j, word_pieces in enumerate(pieces[0], start=1):
        assert flat[batch.word_index[0, j]] == word_pieces[0]
    rows = batch.word_index[0, 1:] // batch.input_ids.shape[1]
    assert len(set(rows.tolist())) > 1


def test_batch_to_keeps_sentences():
    batch_tokenizer = train_subword_tokenizer(TEXT, vocab_size=60, max_length=64)
    sentences = [sentence(["dog"])]
    batch = Collator(batch_tokenizer, 64)(sentences, encode_words(batch_tokenizer, sentences), "en")
    moved = batch.to("cpu")
    assert moved.examples == sentences and moved.lang == "en"
    assert torch.equal(moved.input_ids, batch.input_ids)


def eos_only_tokenizer():
    """A tokenizer framed as Qwen's are: no beginning-of-sequence token, an end-of-text token
    that is also the padding token, no post-processor adding either."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>", "<unk>"],
                                                          show_progress=False))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")  # fmt: skip


@pytest.mark.parametrize("framing", ["cls/sep", "eos only"])
def test_causal_collator_reads_last_subwords_and_the_final_token_as_root(tokenizer, framing):
    tok = tokenizer if framing == "cls/sep" else eos_only_tokenizer()
    sentences = [sentence(["the", "foxes", "jumps"]), sentence(["a", "lazy", "dog", "sleeps", "brownish"])]
    pieces = encode_words(tok, sentences)
    assert any(len(p) > 1 for s in pieces for p in s)  # some words have several pieces
    batch = Collator(tok, max_length=64, causal=True)(sentences, pieces, "xx")
    flat, width = batch.input_ids.flatten(), batch.input_ids.shape[1]
    end = tok.sep_token_id if framing == "cls/sep" else tok.eos_token_id
    for b, sent_pieces in enumerate(pieces):
        length = sum(len(p) for p in sent_pieces) + (2 if framing == "cls/sep" else 1)
        assert batch.word_index[b, 0] == b * width + length - 1  # the root: the final token ...
        assert flat[batch.word_index[b, 0]] == end  # ... which has seen the whole sentence
        for j, word_pieces in enumerate(sent_pieces, start=1):
            assert flat[batch.word_index[b, j]] == word_pieces[-1]
        if framing == "eos only":
            assert flat[b * width] == sent_pieces[0][0]  # no opening token
    assert batch.attention_mask.sum(1).tolist() == [sum(len(p) for p in s) + (2 if framing == "cls/sep" else 1)
                                                    for s in pieces]  # fmt: skip


def test_a_bidirectional_collator_needs_an_opening_token():
    with pytest.raises(ValueError, match="has no cls/sep or bos/eos tokens"):
        Collator(eos_only_tokenizer(), 64)
    Collator(eos_only_tokenizer(), 64, causal=True)  # a decoder reads the root from the end
