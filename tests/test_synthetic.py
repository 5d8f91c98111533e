"""Synthetic languages with controlled typology (subnets.data.synthetic)."""

from __future__ import annotations

import random

import pytest

from subnets.data import synthetic
from subnets.data.synthetic import (
    ADJECTIVE_SIDES,
    ADPOSITION_SIDES,
    CONCEPTS,
    ORDERS,
    SyntheticLanguage,
    build_lexicons,
    generate_sentence,
    generate_treebank,
    to_conllu,
    write_synthetic_treebanks,
)
from subnets.data.treebank import parse_conllu, read_conllu

SIZES = {"train": 120, "dev": 30, "test": 0}


def typology_languages() -> dict[str, SyntheticLanguage]:
    """One language per word order, covering every adjective side and adposition side."""
    languages = {}
    for i, order in enumerate(ORDERS):
        code = f"syn_{order.lower()}"
        languages[code] = SyntheticLanguage(
            code,
            order=order,
            adjective=ADJECTIVE_SIDES[i % 2],
            adposition=ADPOSITION_SIDES[(i // 2) % 2],
            parent="syn_svo" if i else None,
            overlap=0.3 if i else 0.0,
        )
    return languages


LANGUAGES = typology_languages()


@pytest.fixture(scope="module")
def treebanks(tmp_path_factory):
    """Every language of LANGUAGES read back with on_error="raise": {code: [Sentence]}."""
    root = write_synthetic_treebanks(tmp_path_factory.mktemp("synthetic"), LANGUAGES, SIZES, seed=3)
    return {code: read_conllu(root / code / "train.conllu", on_error="raise").examples for code in LANGUAGES}


def dependents(sentence, head: int, deprel: str) -> list[int]:
    """1-based positions of the words attached to word ``head`` with ``deprel``."""
    return [
        i + 1 for i, (h, r) in enumerate(zip(sentence.heads, sentence.deprels)) if h == head and r == deprel
    ]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_another_seed_different_text(tmp_path):
    a = write_synthetic_treebanks(tmp_path / "a", LANGUAGES, SIZES, seed=7)
    b = write_synthetic_treebanks(tmp_path / "b", LANGUAGES, SIZES, seed=7)
    c = write_synthetic_treebanks(tmp_path / "c", LANGUAGES, SIZES, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*.conllu"))
    expected = sorted(
        (a / code / f"{split}.conllu").relative_to(a) for code in LANGUAGES for split, n in SIZES.items() if n
    )
    assert files == expected  # the size-0 test split is not written
    assert sorted(p.relative_to(b) for p in b.rglob("*.conllu")) == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_text(encoding="utf-8") != (c / name).read_text(encoding="utf-8")


def test_rewriting_the_same_content_leaves_files_untouched(tmp_path):
    root = write_synthetic_treebanks(tmp_path, LANGUAGES, {"train": 10}, seed=1)
    path = root / "syn_sov" / "train.conllu"
    before = path.stat()
    write_synthetic_treebanks(tmp_path, LANGUAGES, {"train": 10}, seed=1)
    after = path.stat()
    # a rewrite goes through a temporary file renamed onto the path, which changes the inode
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    write_synthetic_treebanks(tmp_path, LANGUAGES, {"train": 11}, seed=1)
    assert path.stat().st_ino != before.st_ino
    assert len(read_conllu(path).examples) == 11


def test_splits_differ_and_treebank_is_deterministic():
    lexicon = build_lexicons(LANGUAGES, seed=0)["syn_vso"]
    lang = LANGUAGES["syn_vso"]
    train = generate_treebank(lang, lexicon, 20, seed=0, split="train")
    assert train == generate_treebank(lang, lexicon, 20, seed=0, split="train")
    assert train != generate_treebank(lang, lexicon, 20, seed=0, split="dev")
    ids = [s.sent_id for s in parse_conllu(train).examples]
    assert ids == [f"syn_vso-train-{i}" for i in range(1, 21)]


# ----------------------------------------------------------------------------- well-formedness


@pytest.mark.parametrize("seed", [0, 5])
def test_every_sentence_is_a_valid_tree_for_every_order(tmp_path, seed):
    root = write_synthetic_treebanks(tmp_path, LANGUAGES, {"train": 150, "dev": 40}, seed=seed)
    for code in LANGUAGES:
        for split, size in (("train", 150), ("dev", 40)):
            parsed = read_conllu(root / code / f"{split}.conllu", on_error="raise")
            assert len(parsed.examples) == size
            for s in parsed.examples:
                assert s.heads.count(0) == 1
                assert s.deprels[s.heads.index(0)] == "root"
                assert s.upos[s.heads.index(0)] == "VERB"
                assert s.forms[-1] == "." and s.deprels[-1] == "punct"


def test_text_comment_matches_the_forms(tmp_path):
    root = write_synthetic_treebanks(tmp_path, {"l": SyntheticLanguage("l")}, {"train": 30}, seed=2)
    for s in read_conllu(root / "l" / "train.conllu").examples:
        assert s.tokens.metadata["text"] == " ".join(s.forms[:-1]) + "."
        misc = [t["misc"] for t in s.tokens]
        assert misc[-2] == {"SpaceAfter": "No"}
        assert all(m is None for i, m in enumerate(misc) if i != len(misc) - 2)


# ----------------------------------------------------------------------------- typology


@pytest.mark.parametrize("code", list(LANGUAGES))
def test_subject_verb_object_order(treebanks, code):
    order = LANGUAGES[code].order
    checked = 0
    for s in treebanks[code]:
        for verb in (i + 1 for i, u in enumerate(s.upos) if u == "VERB"):
            subjects, objects = dependents(s, verb, "nsubj"), dependents(s, verb, "obj")
            if not (subjects and objects):
                continue
            assert len(subjects) == len(objects) == 1
            positions = {"S": subjects[0], "V": verb, "O": objects[0]}
            linear = "".join(sorted(positions, key=positions.get))
            assert linear == order, f"{s.sent_id}: {linear} in an {order} language"
            checked += 1
    assert checked >= 30  # about 60% of the sentences are transitive


@pytest.mark.parametrize("code", list(LANGUAGES))
def test_intransitive_clauses_keep_subject_verb_order(treebanks, code):
    order = LANGUAGES[code].order
    subject_first = order.index("S") < order.index("V")
    checked = 0
    for s in treebanks[code]:
        verb = s.heads.index(0) + 1
        if dependents(s, verb, "obj"):
            continue
        (subject,) = dependents(s, verb, "nsubj")
        assert (subject < verb) == subject_first, s.sent_id
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("code", list(LANGUAGES))
def test_adjective_side(treebanks, code):
    side = LANGUAGES[code].adjective
    checked = 0
    for s in treebanks[code]:
        for i, (head, rel) in enumerate(zip(s.heads, s.deprels), start=1):
            if rel == "amod":
                assert s.upos[i - 1] == "ADJ" and s.upos[head - 1] == "NOUN"
                assert (i < head) == (side == "before"), (
                    f"{s.sent_id}: amod {i} -> {head} with adjective={side}"
                )
                checked += 1
    assert checked >= 30


@pytest.mark.parametrize("code", list(LANGUAGES))
def test_adposition_side(treebanks, code):
    side = LANGUAGES[code].adposition
    checked = 0
    for s in treebanks[code]:
        for i, (head, rel) in enumerate(zip(s.heads, s.deprels), start=1):
            if rel == "case":
                assert s.upos[i - 1] == "ADP" and s.upos[head - 1] == "NOUN"
                assert (i < head) == (side == "pre"), (
                    f"{s.sent_id}: case {i} -> {head} with adposition={side}"
                )
                checked += 1
    assert checked >= 20


def test_orders_change_only_the_linearisation():
    """The same random draws give the same words in another order: SVO's S V O is OVS's O V S."""
    lexicon = build_lexicons({"a": SyntheticLanguage("a")}, seed=0)["a"]
    found = 0
    for k in range(200):
        svo = generate_sentence(SyntheticLanguage("a", order="SVO"), lexicon, random.Random(k))
        ovs = generate_sentence(SyntheticLanguage("a", order="OVS"), lexicon, random.Random(k))
        assert sorted(w[0] for w in svo) == sorted(w[0] for w in ovs)
        if any(w[3] == "obj" for w in svo) and not any(w[3] in ("obl", "nmod") for w in svo):
            s = parse_conllu(to_conllu(svo, "s")).examples[0]
            o = parse_conllu(to_conllu(ovs, "o")).examples[0]
            assert s.forms[s.heads.index(0)] == o.forms[o.heads.index(0)]
            subject = s.forms[s.deprels.index("nsubj")]
            obj = s.forms[s.deprels.index("obj")]
            assert o.forms[o.deprels.index("nsubj")] == subject and o.forms[o.deprels.index("obj")] == obj
            assert o.deprels.index("obj") < o.heads.index(0) < o.deprels.index("nsubj")
            found += 1
    assert found >= 20


# ----------------------------------------------------------------------------- vocabulary


def shared_fraction(lexicons, child: str, parent: str) -> float:
    same = sum(lexicons[child][c] == lexicons[parent][c] for c in lexicons[parent])
    return same / len(lexicons[parent])


def test_lexicon_covers_every_concept_with_distinct_forms():
    lexicons = build_lexicons(LANGUAGES, seed=4)
    concepts = {(category, i) for category, count in CONCEPTS.items() for i in range(count)}
    for code, lexicon in lexicons.items():
        assert set(lexicon) == concepts
        assert len(set(lexicon.values())) == len(concepts), f"{code} gives two concepts the same form"
    assert build_lexicons(LANGUAGES, seed=4) == lexicons


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_controls_shared_vocabulary(seed):
    languages = {
        "p": SyntheticLanguage("p"),
        "half": SyntheticLanguage("half", order="SOV", parent="p", overlap=0.5),
        "none": SyntheticLanguage("none", parent="p", overlap=0.0),
        "all": SyntheticLanguage("all", order="VSO", parent="p", overlap=1.0),
        "stranger": SyntheticLanguage("stranger"),
    }
    lexicons = build_lexicons(languages, seed=seed)
    assert 0.35 <= shared_fraction(lexicons, "half", "p") <= 0.65
    assert shared_fraction(lexicons, "none", "p") < 0.05
    assert shared_fraction(lexicons, "stranger", "p") < 0.05
    assert shared_fraction(lexicons, "all", "p") == 1.0


def test_parent_order_in_the_mapping_does_not_matter():
    child = SyntheticLanguage("c", parent="p", overlap=0.5)
    parent = SyntheticLanguage("p")
    assert build_lexicons({"c": child, "p": parent}, 3) == build_lexicons({"p": parent, "c": child}, 3)


@pytest.mark.parametrize(
    "settings",
    [
        {"order": "XYZ"},
        {"order": "svo"},
        {"adjective": "middle"},
        {"adposition": "circum"},
        {"overlap": 0.5},  # no parent
        {"overlap": 1.5, "parent": "p"},
        {"overlap": -0.1, "parent": "p"},
    ],
)
def test_invalid_language_settings(settings):
    with pytest.raises(ValueError, match="synthetic language bad"):
        SyntheticLanguage("bad", **settings)


def test_undefined_parent(tmp_path):
    languages = {"a": SyntheticLanguage("a", parent="ghost", overlap=0.5)}
    with pytest.raises(ValueError, match="ghost"):
        build_lexicons(languages, seed=0)
    with pytest.raises(ValueError, match="ghost"):
        write_synthetic_treebanks(tmp_path, languages, {"train": 5})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "languages",
    [
        {
            "a": SyntheticLanguage("a", parent="b", overlap=0.5),
            "b": SyntheticLanguage("b", parent="a", overlap=0.5),
        },
        {"a": SyntheticLanguage("a", parent="a", overlap=0.5)},
        {
            "root": SyntheticLanguage("root"),
            "a": SyntheticLanguage("a", parent="c", overlap=0.2),
            "b": SyntheticLanguage("b", parent="a", overlap=0.2),
            "c": SyntheticLanguage("c", parent="b", overlap=0.2),
        },
    ],
    ids=["two", "self", "three"],
)
def test_parent_cycle(languages):
    with pytest.raises(ValueError, match="parent cycle"):
        build_lexicons(languages, seed=0)


# ----------------------------------------------------------------------------- conflicts


CONFLICT = {
    "base": SyntheticLanguage("base"),
    "x_svo": SyntheticLanguage("x_svo", order="SVO", parent="base", overlap=1.0),
    "y_ovs": SyntheticLanguage("y_ovs", order="OVS", parent="base", overlap=1.0),
}


def test_shared_forms_get_opposite_roles_in_the_same_position(tmp_path):
    """With the full lexicon: a noun opening an SVO sentence is its subject, in OVS its object."""
    root = write_synthetic_treebanks(tmp_path, CONFLICT, {"train": 800}, seed=0)
    x = read_conllu(root / "x_svo" / "train.conllu").examples
    y = read_conllu(root / "y_ovs" / "train.conllu").examples
    assert [s.forms for s in x] != [s.forms for s in y]

    def first_nouns(sentences):
        roles: dict[str, set[str]] = {}
        for s in sentences:
            if s.upos[0] == "NOUN":
                roles.setdefault(s.forms[0], set()).add(s.deprels[0])
        return roles

    x_roles, y_roles = first_nouns(x), first_nouns(y)
    assert set().union(*x_roles.values()) == {"nsubj"}
    assert set().union(*y_roles.values()) == {"obj"}
    shared = set(x_roles) & set(y_roles)
    assert len(shared) >= 10, "the same noun form should open sentences of both languages"


def test_same_string_different_trees(monkeypatch):
    """With a small concept inventory, identical strings with different trees must occur."""
    small = {"NOUN": 3, "VERB_TR": 2, "VERB_INTR": 2, "ADJ": 2, "ADP": 2, "DET": 2}
    monkeypatch.setattr(synthetic, "CONCEPTS", small)
    lexicons = build_lexicons(CONFLICT, seed=0)
    assert lexicons["x_svo"] == lexicons["y_ovs"]
    trees: dict[str, dict[tuple, set]] = {}
    for code in ("x_svo", "y_ovs"):
        parsed = parse_conllu(generate_treebank(CONFLICT[code], lexicons[code], 3000, seed=0, split="train"))
        trees[code] = {}
        for s in parsed.examples:
            trees[code].setdefault(tuple(s.forms), set()).add((tuple(s.heads), tuple(s.deprels)))
    common = set(trees["x_svo"]) & set(trees["y_ovs"])
    conflicting = [forms for forms in common if trees["x_svo"][forms] != trees["y_ovs"][forms]]
    assert conflicting, "no string is read differently by the SVO and the OVS language"
    # every shared transitive string is read differently: subject and object trade places
    for forms in common:
        x_deprels = {d for _, ds in trees["x_svo"][forms] for d in ds}
        if "obj" in x_deprels:
            assert forms in conflicting
