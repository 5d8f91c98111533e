"""CoNLL-U reading, validation and writing (subnets.data.treebank)."""

from __future__ import annotations

import pytest

from subnets.data.treebank import ConlluError, ExampleFile, parse_conllu, read_conllu, write_conllu


def row(word_id, form, upos, head, deprel, feats="_", deps="_", misc="_", lemma="_", xpos="_") -> str:
    return "\t".join(str(c) for c in (word_id, form, lemma, upos, xpos, feats, head, deprel, deps, misc))


def sentence(sent_id: str | None, *rows: str, text: str = "x") -> str:
    comments = ([f"# sent_id = {sent_id}"] if sent_id else []) + [f"# text = {text}"]
    return "\n".join([*comments, *rows]) + "\n\n"


# Lines 1-4, then a blank line 5: a bad sentence appended after it starts on line 6.
GOOD = sentence("good-1", row(1, "a", "NOUN", 2, "nsubj"), row(2, "b", "VERB", 0, "root"))


def three_words(sent_id="bad-1", heads=(2, 0, 2), upos=("NOUN", "VERB", "NOUN"), deprels=None, extra=None):
    """A 3-word sentence (comments on its lines 1-2, words on lines 3-5); ``extra`` replaces rows."""
    deprels = deprels or ["root" if h == 0 else "dep" for h in heads]
    rows = [row(i + 1, f"w{i + 1}", upos[i], heads[i], deprels[i]) for i in range(3)]
    for index, replacement in (extra or {}).items():
        rows[index] = replacement
    return sentence(sent_id, *rows)


# A sentence with comments, a multiword token (2-3), an empty node (3.1), features, enhanced
# dependencies and MISC values: every line must survive a write with new heads and relations.
RICH = (
    "# newdoc id = doc-1\n"
    "# sent_id = rich-1\n"
    "# text = I can't go.\n"
    "1\tI\tI\tPRON\tPRP\tCase=Nom|Number=Sing|Person=1|PronType=Prs\t4\tnsubj\t4:nsubj\t_\n"
    "2-3\tcan't\t_\t_\t_\t_\t_\t_\t_\t_\n"
    "2\tca\tcan\tAUX\tMD\tVerbForm=Fin\t4\taux\t4:aux\t_\n"
    "3\tn't\tnot\tPART\tRB\tPolarity=Neg\t4\tadvmod\t4:advmod\t_\n"
    "3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t4:conj\tCopyOf=4\n"
    "4\tgo\tgo\tVERB\tVB\tVerbForm=Inf\t0\troot\t0:root\tSpaceAfter=No\n"
    "5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t4:punct\t_\n"
    "\n"
)


# ----------------------------------------------------------------------------- valid input


def test_multiword_tokens_and_empty_nodes_are_not_words():
    parsed = parse_conllu(RICH)
    assert isinstance(parsed, ExampleFile)
    assert parsed.skipped == []
    (s,) = parsed.examples
    assert s.sent_id == "rich-1"
    assert s.forms == ["I", "ca", "n't", "go", "."]
    assert s.upos == ["PRON", "AUX", "PART", "VERB", "PUNCT"]
    assert s.heads == [4, 4, 4, 0, 4]
    assert s.deprels == ["nsubj", "aux", "advmod", "root", "punct"]
    assert len(s) == 5
    assert parsed.num_words == 5


def test_subtyped_relations_are_accepted_and_kept():
    text = sentence("s", row(1, "it", "PRON", 2, "nsubj:pass"), row(2, "went", "VERB", 0, "root"))
    (s,) = parse_conllu(text).examples
    assert s.deprels == ["nsubj:pass", "root"]


def test_sentence_without_sent_id_is_named_by_its_position():
    text = GOOD + sentence(None, row(1, "a", "NOUN", 0, "root"))
    parsed = parse_conllu(text)
    assert [s.sent_id for s in parsed.examples] == ["good-1", "#2"]


def test_write_conllu_changes_only_head_and_deprel(tmp_path):
    source = tmp_path / "gold.conllu"
    source.write_text(RICH, encoding="utf-8")
    (s,) = read_conllu(source).examples
    new_heads = [2, 0, 2, 2, 2]
    new_deprels = ["nsubj:pass", "root", "advmod", "obj", "punct"]
    out = write_conllu(tmp_path / "pred.conllu", [s], heads=[new_heads], deprels=[new_deprels])

    original = RICH.splitlines()
    written = out.read_text(encoding="utf-8").splitlines()
    assert len(written) == len(original)
    word = 0
    for before, after in zip(original, written):
        columns = before.split("\t")
        if len(columns) == 10 and columns[0].isdigit():
            expected = columns[:6] + [str(new_heads[word]), new_deprels[word]] + columns[8:]
            assert after.split("\t") == expected
            word += 1
        else:  # comments, the multiword token, the empty node and the blank line
            assert after == before
    assert word == 5

    (again,) = read_conllu(out).examples
    assert again.heads == new_heads
    assert again.deprels == new_deprels
    assert again.forms == s.forms
    # the sentence read first is not modified by writing
    assert s.heads == [4, 4, 4, 0, 4]


def test_write_conllu_rejects_wrong_number_of_predictions(tmp_path):
    (s,) = parse_conllu(RICH).examples
    with pytest.raises(ValueError, match="rich-1"):
        write_conllu(tmp_path / "pred.conllu", [s], heads=[[0, 1, 1]])


def test_write_conllu_keeps_free_form_comments(tmp_path):
    """A comment line without ``key = value`` must be written back too (the docstring promises it)."""
    text = "# sent_id = c1\n# this comment has no equals sign\n" + row(1, "a", "NOUN", 0, "root") + "\n\n"
    source = tmp_path / "gold.conllu"
    source.write_text(text, encoding="utf-8")
    out = write_conllu(tmp_path / "pred.conllu", read_conllu(source).examples)
    assert out.read_text(encoding="utf-8").splitlines() == text.splitlines(), (
        "write_conllu dropped the free-form comment line '# this comment has no equals sign'"
    )


def test_write_conllu_keeps_misc_values_containing_equals(tmp_path):
    """MISC is written as read: a value that itself contains '=' must not be truncated."""
    text = "# sent_id = m1\n" + row(1, "a", "NOUN", 0, "root", misc="Gloss=x=y|SpaceAfter=No") + "\n\n"
    source = tmp_path / "gold.conllu"
    source.write_text(text, encoding="utf-8")
    out = write_conllu(tmp_path / "pred.conllu", read_conllu(source).examples)
    misc = out.read_text(encoding="utf-8").splitlines()[1].split("\t")[9]
    assert misc == "Gloss=x=y|SpaceAfter=No", f"MISC written as {misc!r}"


def test_windows_line_endings_parse_like_unix(tmp_path):
    text = GOOD + RICH + three_words("w-3")
    unix = parse_conllu(text)
    windows = parse_conllu(text.replace("\n", "\r\n"))
    path = tmp_path / "crlf.conllu"
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    from_file = read_conllu(path)
    for parsed in (windows, from_file):
        assert len(parsed.examples) == len(unix.examples) == 3
        for a, b in zip(unix.examples, parsed.examples):
            assert (a.sent_id, a.forms, a.upos, a.heads, a.deprels) == (
                b.sent_id,
                b.forms,
                b.upos,
                b.heads,
                b.deprels,
            )
            assert not any("\r" in f for f in b.forms + b.deprels)
    # errors are located on the same line
    bad = GOOD + three_words(heads=(2, "x", 0))
    with pytest.raises(ConlluError) as unix_error:
        parse_conllu(bad)
    with pytest.raises(ConlluError) as windows_error:
        parse_conllu(bad.replace("\n", "\r\n"))
    assert unix_error.value.line == windows_error.value.line == 9


def test_unicode_line_separators_inside_a_field_do_not_split_the_line():
    """CoNLL-U lines end at '\\n' only; NEL, LINE SEPARATOR or form feed in a FORM are not line breaks."""
    split = {}
    for char in ("\x85", "\u2028", "\x0c"):
        text = sentence("u1", row(1, f"a{char}b", "NOUN", 0, "root"))
        try:
            forms = parse_conllu(text).examples[0].forms
        except ConlluError as error:
            forms = str(error)
        if forms != [f"a{char}b"]:
            split[char] = forms
    assert split == {}, f"a FORM holding these characters was split into two lines: {split}"


# ----------------------------------------------------------------------------- invalid input

# (id, text after GOOD, expected line, expected sent_id, fragment of the problem)
BAD = [
    (
        "nine-columns",
        three_words(extra={1: "\t".join(["2", "w2", "_", "VERB", "_", "_", "0", "root", "_"])}),
        9,
        "bad-1",
        "found 9",
    ),
    ("head-x", three_words(heads=(2, 0, "x")), 10, "bad-1", "HEAD 'x' is not an integer"),
    ("head-underscore", three_words(heads=("_", 0, 2)), 8, "bad-1", "HEAD '_' is not an integer"),
    ("head-out-of-range", three_words(heads=(2, 0, 4)), 10, "bad-1", "out of range"),
    ("no-root", three_words(heads=(2, 3, 2)), 8, "bad-1", "no root"),
    ("two-roots", three_words(heads=(0, 1, 0)), 10, "bad-1", "several roots"),
    (
        "three-roots",
        three_words(heads=(2, 0, 0), extra={0: row(1, "w1", "NOUN", 0, "root")}),
        9,
        "bad-1",
        "several roots",
    ),
    ("cycle", three_words(heads=(0, 3, 2)), 9, "bad-1", "cycle in the tree: 2 -> 3 -> 2"),
    ("bad-upos", three_words(upos=("NOUN", "VB", "NOUN")), 9, "bad-1", "UPOS 'VB'"),
    ("bad-deprel", three_words(deprels=["subj:pass", "root", "obj"]), 8, "bad-1", "DEPREL 'subj:pass'"),
    (
        "bad-deprel-no-subtype",
        three_words(deprels=["nsubj", "root", "object"]),
        10,
        "bad-1",
        "DEPREL 'object'",
    ),
    ("no-sent-id", three_words(sent_id=None, heads=(0, 0, 2)), 8, "#2", "several roots"),
]


def check_error(error: ConlluError, path: str, line: int, sent_id: str | None, fragment: str):
    assert error.path == str(path)
    assert error.line == line
    assert error.sent_id == sent_id
    message = str(error)
    assert f"{path}:{line}" in message
    assert fragment in message
    if sent_id is not None:
        assert f"(sentence {sent_id})" in message
    else:
        assert "(sentence" not in message


@pytest.mark.parametrize(
    ("bad", "line", "sent_id", "fragment"), [case[1:] for case in BAD], ids=[c[0] for c in BAD]
)
def test_invalid_sentence_in_a_string(bad, line, sent_id, fragment):
    # the bad sentence starts on line 6, after one good sentence; a good one follows it
    with pytest.raises(ConlluError) as info:
        parse_conllu(GOOD + bad + GOOD, path="mem.conllu")
    check_error(info.value, "mem.conllu", line, sent_id, fragment)


@pytest.mark.parametrize(
    ("bad", "line", "sent_id", "fragment"), [case[1:] for case in BAD], ids=[c[0] for c in BAD]
)
def test_invalid_sentence_in_a_file(tmp_path, bad, line, sent_id, fragment):
    path = tmp_path / "bad.conllu"
    path.write_text(GOOD + bad + GOOD, encoding="utf-8")
    with pytest.raises(ConlluError) as info:
        read_conllu(path)
    check_error(info.value, path, line, sent_id, fragment)


def test_error_line_is_counted_in_the_whole_file_not_the_sentence():
    # several blank lines between sentences shift the line numbers
    text = "\n\n" + GOOD + "\n\n" + three_words(heads=(2, 0, 7))
    with pytest.raises(ConlluError) as info:
        parse_conllu(text)
    assert info.value.line == 2 + 5 + 2 + 5


@pytest.mark.parametrize("text", ["", "\n\n   \n\t\n\n"], ids=["empty", "blank-lines"])
def test_file_without_sentences(tmp_path, text):
    path = tmp_path / "empty.conllu"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConlluError) as info:
        read_conllu(path)
    assert info.value.line == 1
    assert info.value.sent_id is None
    assert info.value.path == str(path)
    assert f"{path}:1:" in str(info.value)
    assert "(sentence" not in str(info.value)
    with pytest.raises(ConlluError) as info:
        parse_conllu(text)
    assert (info.value.line, info.value.sent_id) == (1, None)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.conllu"):
        read_conllu(tmp_path / "missing.conllu")


# ----------------------------------------------------------------------------- on_error


def test_skip_keeps_good_sentences_and_reports_bad_ones(tmp_path):
    # each sentence takes 6 lines (2 comments, 3 words, 1 blank)
    text = (
        three_words("ok-1")  # lines 1-5
        + three_words("bad-a", heads=(2, 0, 9))  # lines 7-11, word 3 on line 11
        + three_words("ok-2")  # lines 13-17
        + three_words("bad-b", upos=("NOUN", "XX", "NOUN"))  # lines 19-23, word 2 on line 22
        + three_words("bad-c", heads=(0, 3, 2))  # lines 25-29, cycle at word 2 (line 28)
    )
    path = tmp_path / "mixed.conllu"
    path.write_text(text, encoding="utf-8")
    parsed = read_conllu(path, on_error="skip")
    assert [s.sent_id for s in parsed.examples] == ["ok-1", "ok-2"]
    assert [(e.sent_id, e.line) for e in parsed.skipped] == [("bad-a", 11), ("bad-b", 22), ("bad-c", 28)]
    assert all(isinstance(e, ConlluError) and e.path == str(path) for e in parsed.skipped)
    assert parsed.num_words == 6
    with pytest.raises(ConlluError) as info:
        read_conllu(path)  # the default raises at the first bad sentence
    assert (info.value.sent_id, info.value.line) == ("bad-a", 11)


def test_skip_with_no_valid_sentence_still_raises(tmp_path):
    path = tmp_path / "allbad.conllu"
    path.write_text(three_words("b1", heads=(0, 0, 0)) + three_words("b2", heads=(2, 3, 1)), encoding="utf-8")
    with pytest.raises(ConlluError) as info:
        read_conllu(path, on_error="skip")
    assert info.value.line == 1
    assert info.value.sent_id is None
    assert "no valid sentence" in str(info.value)


def test_unknown_on_error_mode_raises_value_error():
    with pytest.raises(ValueError, match="on_error") as info:
        parse_conllu(GOOD, on_error="ignore")
    assert not isinstance(info.value, ConlluError)
