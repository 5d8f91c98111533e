"""Readers: a file of another task's format refused at ``subnets.predict`` (format=auto), NER
tokens with spaces, classification records (unknown keys, pairs, labels as written), and a
tagging column that holds no tag."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import tiny_config, write_ud_root

from subnets.data.examples import DataError
from subnets.runs.trained import TrainedRun
from subnets.tasks import NER, Classification, LanguageModelling, Parsing, Tagging
from subnets.training.assemble import assemble

CONLLU = "# sent_id = s1\n# text = wino lue\n1\twino\t_\t_\t_\t_\t0\troot\t_\t_\n2\tlue\t_\t_\t_\t_\t1\tobj\t_\t_\n\n"
CONLL = "-DOCSTART- O\n\nAnna\tB-PER\nreads\tO\n\nin\tO\nRiga\tB-LOC\n"
JSONL = '{"text": "a b", "label": "x"}\n{"text": "c", "label": "y"}\n'
TSV = "text\tlabel\na b\tx\n"
CONLLU_TASKS = "CoNLL-U or plain text \\(format=conllu\\|text\\)"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def stub(task, predict):
    """What ``TrainedRun.predict_file`` uses of a trained run: its task and its predictions."""
    return SimpleNamespace(
        task=task, predict=lambda examples, language, support: [predict(e) for e in examples]
    )


# ---------------------------------------------------------------- predict: another task's file
@pytest.mark.parametrize(
    ("task", "name", "text", "message"),
    [(Parsing(), "x.conll", CONLL, rf"x.conll:3: looks like CoNLL NER .*; the parsing task reads {CONLLU_TASKS}"),
     (Parsing(), "x.jsonl", JSONL, rf"x.jsonl:1: looks like JSON lines; the parsing task reads {CONLLU_TASKS}"),
     (Parsing(), "x.tsv", TSV, rf"x.tsv:1: looks like TSV .*; the parsing task reads {CONLLU_TASKS}"),
     (Tagging(), "x.jsonl", JSONL, rf"x.jsonl:1: looks like JSON lines; the pos task reads {CONLLU_TASKS}"),
     (NER(), "x.conllu", CONLLU, r"x.conllu:3: looks like CoNLL-U; the ner task reads CoNLL NER .* or plain text \(format=conll\|text\)"),
     (NER(), "x.jsonl", JSONL, r"x.jsonl:1: looks like JSON lines; the ner task reads CoNLL NER"),
     (Classification(), "x.conllu", CONLLU, r"x.conllu:3: looks like CoNLL-U; the classification task reads JSON lines or TSV"),
     (Classification(), "x.conll", CONLL, r"x.conll:3: looks like CoNLL NER .*; the classification task reads JSON lines"),
     (Classification(), "x.txt", "a b\n", r"x.txt:1: looks like plain text; the classification task reads JSON lines"),
     (LanguageModelling(), "x.jsonl", JSONL, r"x.jsonl:1: looks like JSON lines; the mlm task reads plain text"),
     (LanguageModelling(), "x.txt", CONLL, r"x.txt:3: looks like CoNLL NER .*; the mlm task reads plain text")],
)  # fmt: skip
def test_predict_refuses_a_file_of_another_tasks_format(tmp_path, task, name, text, message):
    source = write(tmp_path / name, text)
    run = stub(task, lambda e: None)
    with pytest.raises(DataError, match=message):
        TrainedRun.predict_file(run, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_text_with_tabs_braces_and_comments_is_not_refused(tmp_path):
    text = write(tmp_path / "x.txt", "# a heading\n{not json} lue\nwino\tlue qexy\n")
    assert [s.forms for s in NER().read_unlabelled(text)] == [["#", "a", "heading"], ["{not", "json}", "lue"],
                                                              ["wino", "lue", "qexy"]]  # fmt: skip
    assert len(LanguageModelling().read_unlabelled(text)) == 3
    braces = write(tmp_path / "y.txt", "{not json} lue\nwino\tlue\n")
    assert [s.forms for s in Parsing().read_unlabelled(braces)] == [["{not", "json}", "lue"], ["wino", "lue"]]
    assert [s.forms for s in Tagging().read_unlabelled(braces)] == [["{not", "json}", "lue"], ["wino", "lue"]]


def test_format_text_forces_plain_text(tmp_path):
    source = write(tmp_path / "x.jsonl", JSONL)
    assert [s.forms for s in Parsing().read_unlabelled(source, "text")] == [
        line.split() for line in JSONL.splitlines()
    ]
    conllu = write(tmp_path / "x.conllu", CONLLU)
    assert len(NER().read_unlabelled(conllu, "text")) == 4  # every line a sentence


def test_files_of_the_tasks_own_format_are_still_annotated(tmp_path):
    ner = NER()
    ner.labels = ["O", "B-PER", "I-PER"]
    out = TrainedRun.predict_file(
        stub(ner, lambda e: [1] * len(e)), write(tmp_path / "x.conll", CONLL), tmp_path / "o.conll"
    )
    assert out.read_text() == "Anna\tB-PER\nreads\tB-PER\n\nin\tB-PER\nRiga\tB-PER\n\n"
    out = TrainedRun.predict_file(stub(ner, lambda e: [0] * len(e)), write(tmp_path / "x.txt", "New York is\n"),
                                  tmp_path / "o2.conll")  # fmt: skip
    assert out.read_text() == "New\tO\nYork\tO\nis\tO\n\n"
    tagger = Tagging()
    tagger.labels = ["NOUN", "VERB"]
    out = TrainedRun.predict_file(stub(tagger, lambda e: [1] * len(e)), write(tmp_path / "x.conllu", CONLLU),
                                  tmp_path / "o.conllu")  # fmt: skip
    assert [line.split("\t")[3] for line in out.read_text().split("\n") if line[:1].isdigit()] == [
        "VERB",
        "VERB",
    ]
    classifier = Classification()
    classifier.labels = ["x", "y"]
    for name, text, count in (("x.jsonl", JSONL, 2), ("x.tsv", TSV, 1)):
        source = write(tmp_path / name, text)
        out = TrainedRun.predict_file(stub(classifier, lambda e: 1), source, tmp_path / f"o{name}")
        assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == ["y"] * count


# ---------------------------------------------------------------- NER tokens
def test_a_tab_separated_ner_token_is_kept_whole(tmp_path):
    path = write(tmp_path / "train.conll", "New York\tB-LOC\nis\tO\n\nEU\tNNP\tB-NP\tB-ORG\nrejects O\n")
    assert [(e.forms, e.tags) for e in NER().read(path).examples] == [
        (["New York", "is"], ["B-LOC", "O"]),
        (["EU", "rejects"], ["B-ORG", "O"]),
    ]
    assert [
        e.forms for e in NER().read_unlabelled(write(tmp_path / "in.conll", "New York\tO\nis\n"), "conll")
    ] == [["New York", "is"]]
    with pytest.raises(DataError, match=r"bad.conll:2 \(sentence 1\): the token is empty"):
        NER().read(write(tmp_path / "bad.conll", "Anna\tB-PER\n\tO\n"))


# ---------------------------------------------------------------- classification records
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("train.jsonl", '{"text": "a b", "text_pair": "c", "label": "x"}\n{"text": "a", "pair": "c", "label": "y"}\n',
      r"train.jsonl:2: unknown key 'pair' \(a record has id, text, text_pair and label\)"),
     ("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "a", "pair": "c", "label": "y"}\n',
      r"train.jsonl:2: unknown key 'pair'"),
     ("train.tsv", "text\tpair\tlabel\na\tb\tx\n", r"train.tsv:1: unknown column 'pair' \(a header names id, text, text_pair and label\)"),
     ("train.jsonl", '{"text": "a", "text_pair": "b", "label": "x"}\n{"text": "a", "label": "y"}\n',
      r"train.jsonl:2 .*has no text_pair, while line 1 has one \(a file holds pairs or single texts, not both\)"),
     ("train.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "a", "text_pair": "b", "label": "y"}\n',
      r"train.jsonl:3 .*has a text_pair, while line 1 has none \(a file holds pairs or single texts, not both\)")],
)  # fmt: skip
def test_classification_records_are_refused_naming_the_file_line_and_key(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=message):
            Classification().read(path, on_error)


def test_labels_are_kept_as_the_file_writes_them(tmp_path):
    labels = ["1", "1.0", "true", "false", "x", "0"]
    path = write(tmp_path / "train.jsonl", "".join(f'{{"text": "a", "label": {label if label != "x" else json.dumps(label)}}}\n'
                                                   for label in labels))  # fmt: skip
    task = Classification()
    examples = task.read(path).examples
    assert [e.label for e in examples] == labels
    task.fit({"xx": examples})
    assert task.labels == sorted(labels)


# ---------------------------------------------------------------- tagging: an unannotated column
def blank_column(text: str, column: int) -> str:
    lines = []
    for line in text.split("\n"):
        columns = line.split("\t")
        if len(columns) == 10:
            columns[column] = "_"
        lines.append("\t".join(columns))
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("task", "message"),
    [(Tagging(), r"train.conllu:1: column UPOS is '_' on every word; the pos task needs it annotated \(task.column="),
     (Tagging("xpos"), r"train.conllu:1: column XPOS is '_' on every word; the tagging_xpos task needs it annotated")],
)  # fmt: skip
def test_a_tagging_column_that_is_blank_everywhere_is_refused_when_read(tmp_path, task, message):
    path = write(tmp_path / "train.conllu", CONLLU)  # every column _
    with pytest.raises(DataError, match=message):
        task.read(path)
    partly = write(
        tmp_path / "dev.conllu", CONLLU + CONLLU.replace("1\twino\t_\t_\t_", "1\twino\t_\tNOUN\tN")
    )
    assert [e.tags for e in task.read(partly).examples][1][0] in ("NOUN", "N")  # one tag is enough


@pytest.mark.parametrize("split", ["train", "dev"])
def test_a_pos_run_with_a_blank_upos_file_stops_at_start_naming_it(tmp_path, split):
    root = write_ud_root(tmp_path / "ud")
    (root / "xx").mkdir()
    for name in ("train", "dev"):
        text = (root / "syn_svo" / f"{name}.conllu").read_text()
        write(root / "xx" / f"{name}.conllu", blank_column(text, 3) if name == split else text)
    cfg = tiny_config("task=pos", "languages.source=ud", f"languages.ud_root={root}", "languages.train=[xx]",
                      "languages.dev=[xx]", "languages.target=[syn_vos]")  # fmt: skip
    with pytest.raises(DataError, match=rf"xx/{split}.conllu:1: column UPOS is '_' on every word"):
        assemble(cfg, tmp_path / "run")
