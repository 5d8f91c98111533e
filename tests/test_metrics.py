"""UAS/LAS/UPOS scoring against hand-computed values (CoNLL 2018 scorer conventions)."""

from __future__ import annotations

import re

import pytest

from subnets.data.treebank import read_conllu
from subnets.metrics import attachment_scores, score_conllu


def conllu(rows: list[str]) -> str:
    """Join rows whose columns are separated by single spaces into CoNLL-U text."""
    return "\n".join(row if row.startswith("#") or not row else "\t".join(row.split()) for row in rows) + "\n"


# Two sentences, 12 syntactic words: 7 + 5. The multiword token line 3-4 and the empty node
# 5.1 are not words.
GOLD = conllu(
    [
        "# sent_id = s1",
        "# text = His cat doesn't sleep today.",
        "1 His he PRON _ _ 2 nmod:poss _ _",
        "2 cat cat NOUN _ _ 5 nsubj _ _",
        "3-4 doesn't _ _ _ _ _ _ _ _",
        "3 does do AUX _ _ 5 aux _ _",
        "4 n't not PART _ _ 5 advmod _ _",
        "5 sleep sleep VERB _ _ 0 root _ _",
        "6 today today NOUN _ _ 5 obl:tmod _ _",
        "7 . . PUNCT _ _ 5 punct _ _",
        "",
        "# sent_id = s2",
        "# text = Dogs that barked ran.",
        "1 Dogs dog NOUN _ _ 4 nsubj _ _",
        "2 that that PRON _ _ 3 nsubj _ _",
        "3 barked bark VERB _ _ 1 acl:relcl _ _",
        "4 ran run VERB _ _ 0 root _ _",
        "5 . . PUNCT _ _ 4 punct _ _",
        "5.1 ran run VERB _ _ _ _ 4:conj _",
        "",
    ]
)

# The same words with errors (gold in brackets):
#   s1 w1 His    head 2 right, nmod        [nmod:poss]  other subtype: correct for LAS
#   s1 w2 cat    head 6 WRONG  [5], nsubj right         wrong for UAS and LAS
#   s1 w4 n't    UPOS ADV WRONG [PART]                  wrong for UPOS only
#   s1 w6 today  head 5 right, obj WRONG [obl:tmod]     right for UAS, wrong for LAS
#   s2 w3 barked head 1 right, acl:cleft [acl:relcl]    other subtype: correct for LAS
#   s2 w5 .      head 3 WRONG  [4], punct right         punctuation counts: wrong for UAS, LAS
# words = 12
# UAS  = (12 - 2 wrong heads) / 12            = 10/12
# LAS  = (12 - 2 wrong heads - 1 wrong rel) / 12 = 9/12
# UPOS = (12 - 1) / 12                        = 11/12
SYSTEM = conllu(
    [
        "# sent_id = s1",
        "# text = His cat doesn't sleep today.",
        "1 His he PRON _ _ 2 nmod _ _",
        "2 cat cat NOUN _ _ 6 nsubj _ _",
        "3-4 doesn't _ _ _ _ _ _ _ _",
        "3 does do AUX _ _ 5 aux _ _",
        "4 n't not ADV _ _ 5 advmod _ _",
        "5 sleep sleep VERB _ _ 0 root _ _",
        "6 today today NOUN _ _ 5 obj _ _",
        "7 . . PUNCT _ _ 5 punct _ _",
        "",
        "# sent_id = s2",
        "# text = Dogs that barked ran.",
        "1 Dogs dog NOUN _ _ 4 nsubj _ _",
        "2 that that PRON _ _ 3 nsubj _ _",
        "3 barked bark VERB _ _ 1 acl:cleft _ _",
        "4 ran run VERB _ _ 0 root _ _",
        "5 . . PUNCT _ _ 3 punct _ _",
        "5.1 ran run VERB _ _ _ _ 4:conj _",
        "",
    ]
)

EXPECTED = {"words": 12, "uas": 100 * 10 / 12, "las": 100 * 9 / 12, "upos": 100 * 11 / 12}


@pytest.fixture
def files(tmp_path):
    gold, system = tmp_path / "gold.conllu", tmp_path / "system.conllu"
    gold.write_text(GOLD, encoding="utf-8")
    system.write_text(SYSTEM, encoding="utf-8")
    return gold, system


def predictions(path):
    sentences = read_conllu(path).examples
    return (
        [list(s.heads) for s in sentences],
        [list(s.deprels) for s in sentences],
        [list(s.upos) for s in sentences],
    )


def test_gold_file_reads_as_twelve_syntactic_words(files):
    gold, _ = files
    sentences = read_conllu(gold).examples
    assert [len(s) for s in sentences] == [7, 5]
    assert sentences[0].forms == ["His", "cat", "does", "n't", "sleep", "today", "."]
    assert sentences[1].forms == ["Dogs", "that", "barked", "ran", "."]


def test_score_conllu_hand_computed(files):
    gold, system = files
    scores = score_conllu(gold, system)
    assert set(scores) == {"words", "uas", "las", "upos"}
    assert scores["words"] == 12
    assert scores["uas"] == pytest.approx(100 * 10 / 12)
    assert scores["las"] == pytest.approx(100 * 9 / 12)
    assert scores["upos"] == pytest.approx(100 * 11 / 12)


def test_score_conllu_accepts_str_paths(files):
    gold, system = files
    assert score_conllu(str(gold), str(system)) == pytest.approx(EXPECTED)


def test_perfect_predictions_score_100(files):
    gold, _ = files
    scores = score_conllu(gold, gold)
    assert scores == pytest.approx({"words": 12, "uas": 100.0, "las": 100.0, "upos": 100.0})

    sentences = read_conllu(gold).examples
    heads, deprels, upos = predictions(gold)
    assert attachment_scores(sentences, heads, deprels, upos) == pytest.approx(
        {"words": 12, "uas": 100.0, "las": 100.0, "upos": 100.0}
    )


def test_attachment_scores_with_lists_matches_score_conllu(files):
    gold, system = files
    sentences = read_conllu(gold).examples
    heads, deprels, upos = predictions(system)
    assert attachment_scores(sentences, heads, deprels, upos) == pytest.approx(EXPECTED)
    # Tuples work as well as lists.
    as_tuples = [tuple(h) for h in heads], [tuple(r) for r in deprels], [tuple(u) for u in upos]
    assert attachment_scores(sentences, *as_tuples) == pytest.approx(EXPECTED)


def test_subtypes_are_ignored_in_both_directions(files):
    gold, _ = files
    sentences = read_conllu(gold).examples
    heads, deprels, _ = predictions(gold)
    # Strip every subtype from the prediction, or add one to a plain relation: still 100 LAS.
    stripped = [[r.split(":")[0] for r in sent] for sent in deprels]
    added = [[r if ":" in r else r + ":x" for r in sent] for sent in deprels]
    assert attachment_scores(sentences, heads, stripped)["las"] == pytest.approx(100.0)
    assert attachment_scores(sentences, heads, added)["las"] == pytest.approx(100.0)
    # A different universal relation with the right subtype is wrong.
    wrong = [list(sent) for sent in deprels]
    wrong[0][0] = "det:poss"  # gold nmod:poss
    assert attachment_scores(sentences, heads, wrong)["las"] == pytest.approx(100 * 11 / 12)


def test_las_needs_the_right_head(files):
    gold, _ = files
    sentences = read_conllu(gold).examples
    heads, deprels, _ = predictions(gold)
    heads[1][4] = 1  # the punctuation word of s2: gold head 4
    heads[0][0] = 0  # His: gold head 2
    scores = attachment_scores(sentences, heads, deprels)
    assert scores == pytest.approx({"words": 12, "uas": 100 * 10 / 12, "las": 100 * 10 / 12})


def test_only_heads_gives_uas_without_las(files):
    gold, system = files
    sentences = read_conllu(gold).examples
    heads, _, _ = predictions(system)
    scores = attachment_scores(sentences, heads)
    assert set(scores) == {"words", "uas"}
    assert scores["words"] == 12
    assert scores["uas"] == pytest.approx(100 * 10 / 12)


def test_only_upos_gives_only_upos(files):
    gold, system = files
    sentences = read_conllu(gold).examples
    _, _, upos = predictions(system)
    scores = attachment_scores(sentences, upos=upos)
    assert set(scores) == {"words", "upos"}
    assert scores["upos"] == pytest.approx(100 * 11 / 12)


@pytest.mark.parametrize("column", ["heads", "deprels", "upos"])
def test_prediction_of_wrong_length_raises_naming_the_sentence(files, column):
    gold, system = files
    sentences = read_conllu(gold).examples
    heads, deprels, upos = predictions(system)
    values = {"heads": heads, "deprels": deprels, "upos": upos}
    values[column][1] = values[column][1][:-1]  # s2 has 5 words; predict 4
    with pytest.raises(ValueError, match=rf"sentence s2\b.*4 predicted {column} for 5 words"):
        attachment_scores(sentences, **values)


def test_no_gold_words_raises():
    with pytest.raises(ValueError, match="no gold words"):
        attachment_scores([], [])


def test_different_number_of_sentences_raises_with_file_name(files, tmp_path):
    gold, _ = files
    short = tmp_path / "one_sentence.conllu"
    short.write_text(SYSTEM.split("\n\n")[0] + "\n\n", encoding="utf-8")
    assert len(read_conllu(short).examples) == 1
    with pytest.raises(ValueError, match=re.escape(str(short))) as info:
        score_conllu(gold, short)
    assert "1 sentences" in str(info.value)
    assert "has 2" in str(info.value)


def test_different_word_form_raises_with_file_name(files, tmp_path):
    gold, _ = files
    retokenized = tmp_path / "retokenized.conllu"
    retokenized.write_text(SYSTEM.replace("\tDogs\t", "\tDog\t", 1), encoding="utf-8")
    assert read_conllu(retokenized).examples[1].forms[0] == "Dog"
    with pytest.raises(ValueError, match=re.escape(str(retokenized))) as info:
        score_conllu(gold, retokenized)
    assert "s2" in str(info.value)


def test_different_tokenization_raises(files, tmp_path):
    gold, _ = files
    # "doesn't" as one word: same number of sentences, different words.
    first = conllu(
        [
            "# sent_id = s1",
            "1 His he PRON _ _ 2 nmod:poss _ _",
            "2 cat cat NOUN _ _ 4 nsubj _ _",
            "3 doesn't do AUX _ _ 4 aux _ _",
            "4 sleep sleep VERB _ _ 0 root _ _",
            "5 today today NOUN _ _ 4 obl:tmod _ _",
            "6 . . PUNCT _ _ 4 punct _ _",
        ]
    )
    path = tmp_path / "merged.conllu"
    path.write_text(first + "\n" + GOLD.split("\n\n")[1] + "\n\n", encoding="utf-8")
    assert [len(s) for s in read_conllu(path).examples] == [6, 5]
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        score_conllu(gold, path)
    assert "s1" in str(info.value)
