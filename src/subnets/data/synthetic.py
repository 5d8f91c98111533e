"""Synthetic languages: UD-style treebanks for artificial languages with controlled typology.

All languages share one lexicon of *concepts* (nouns, transitive and intransitive verbs,
adjectives, adpositions, determiners) and one grammar of simple clauses::

    clause := subject-NP verb [object-NP] [oblique-PP] "."
    NP     := [determiner] noun [adjective]* [nominal-PP]
    PP     := adposition NP

Languages differ in their *surface forms* (each draws its own syllable inventory) and in their
*typology*: the order of subject, verb and object, the side of adjectives, and prepositions
versus postpositions. A language may name a ``parent`` whose forms it reuses for a fraction
``overlap`` of the concepts, which makes related languages share vocabulary. With shared
forms and different word orders, the same string means different trees in different languages,
so the languages really conflict: a controlled testbed for language-specific subnetworks.

Everything is deterministic for a seed; the same concept lexicon is used for every seed.

Example::

    langs = {"syn_svo": SyntheticLanguage("syn_svo", order="SVO"),
             "syn_sov": SyntheticLanguage("syn_sov", order="SOV", adposition="post",
                                          parent="syn_svo", overlap=0.5)}
    write_synthetic_treebanks("data/synthetic", langs, {"train": 500, "dev": 100}, seed=1)
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from subnets.files import atomic_write_text

ORDERS = ("SVO", "SOV", "VSO", "VOS", "OVS", "OSV")
ADJECTIVE_SIDES = ("before", "after")
ADPOSITION_SIDES = ("pre", "post")

# The shared concept lexicon: (category, number of concepts).
CONCEPTS = {"NOUN": 80, "VERB_TR": 30, "VERB_INTR": 20, "ADJ": 25, "ADP": 8, "DET": 4}
_CONSONANTS = "ptkbdgmnszlrfvhjwcxq"
_VOWELS = "aeiouy"
_SYLLABLES = {
    "NOUN": (2, 3),
    "VERB_TR": (2, 3),
    "VERB_INTR": (2, 3),
    "ADJ": (2, 3),
    "ADP": (1, 1),
    "DET": (1, 1),
}


@dataclass(frozen=True)
class SyntheticLanguage:
    """Typology and vocabulary settings of one artificial language.

    Args:
        code: language code, used as the treebank folder name.
        order: order of subject, verb and object (one of ``ORDERS``).
        adjective: adjectives ``"before"`` or ``"after"`` their noun.
        adposition: ``"pre"`` (prepositions, nominal PPs after the noun) or ``"post"``
            (postpositions, nominal PPs before the noun).
        parent: code of a related language whose surface forms this one reuses.
        overlap: fraction of concepts (drawn at random) whose form is the parent's.
    """

    code: str
    order: str = "SVO"
    adjective: str = "before"
    adposition: str = "pre"
    parent: str | None = None
    overlap: float = 0.0

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"synthetic language {self.code}: order {self.order!r} is not one of {ORDERS}")
        if self.adjective not in ADJECTIVE_SIDES:
            raise ValueError(
                f"synthetic language {self.code}: adjective {self.adjective!r} not in {ADJECTIVE_SIDES}"
            )
        if self.adposition not in ADPOSITION_SIDES:
            raise ValueError(
                f"synthetic language {self.code}: adposition {self.adposition!r} not in {ADPOSITION_SIDES}"
            )
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(
                f"synthetic language {self.code}: overlap must lie in [0, 1], got {self.overlap}"
            )
        if self.overlap > 0 and not self.parent:
            raise ValueError(
                f"synthetic language {self.code}: overlap {self.overlap} needs a parent language"
            )


def build_lexicons(
    languages: Mapping[str, SyntheticLanguage], seed: int
) -> dict[str, dict[tuple[str, int], str]]:
    """Surface form of every concept ``(category, index)`` in every language."""
    lexicons: dict[str, dict[tuple[str, int], str]] = {}

    def build(code: str, visiting: tuple[str, ...] = ()) -> dict[tuple[str, int], str]:
        if code in lexicons:
            return lexicons[code]
        if code in visiting:
            raise ValueError(f"synthetic languages: parent cycle {' -> '.join((*visiting, code))}")
        if code not in languages:
            raise ValueError(f"synthetic language {visiting[-1]}: parent {code!r} is not defined")
        lang = languages[code]
        parent = build(lang.parent, (*visiting, code)) if lang.parent else None
        rng = random.Random(f"{seed}/lexicon/{code}")
        consonants = rng.sample(_CONSONANTS, 10)
        vowels = rng.sample(_VOWELS, 4)
        used: set[str] = set()
        lexicon = {}
        for category, count in CONCEPTS.items():
            low, high = _SYLLABLES[category]
            for index in range(count):
                concept = (category, index)
                inherit = parent is not None and rng.random() < lang.overlap
                form = parent[concept] if inherit else None
                while form is None or form in used:
                    syllables = rng.randint(low, high)
                    form = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
                    if category in ("ADP", "DET"):
                        form += rng.choice(vowels)
                used.add(form)
                lexicon[concept] = form
        lexicons[code] = lexicon
        return lexicon

    for code in languages:
        build(code)
    return lexicons


class _Tree:
    """Words of a sentence under construction: (form, upos, head word object or None, deprel)."""

    def __init__(self):
        self.words: list[list] = []

    def add(self, form: str, upos: str, deprel: str) -> list:
        word = [form, upos, None, deprel]
        self.words.append(word)
        return word


def generate_sentence(
    lang: SyntheticLanguage, lexicon: Mapping[tuple[str, int], str], rng: random.Random
) -> list:
    """One sentence as an ordered list of words ``[form, upos, head word or None, deprel]``."""
    tree = _Tree()

    def concept(category: str) -> str:
        return lexicon[(category, rng.randrange(CONCEPTS[category]))]

    def noun_phrase(deprel: str, depth: int) -> tuple[list, list]:
        noun = tree.add(concept("NOUN"), "NOUN", deprel)
        before, after = [], []
        if rng.random() < 0.5:
            det = tree.add(concept("DET"), "DET", "det")
            det[2] = noun
            before.append([det])
        adjectives = []
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            adj = tree.add(concept("ADJ"), "ADJ", "amod")
            adj[2] = noun
            adjectives.append([adj])
        (before if lang.adjective == "before" else after).extend(adjectives)
        if depth == 0 and rng.random() < 0.2:
            pp_head, pp_words = prepositional_phrase("nmod", depth + 1)
            pp_head[2] = noun
            (after if lang.adposition == "pre" else before).append(pp_words)
        words = [w for part in before for w in part] + [noun] + [w for part in after for w in part]
        return noun, words

    def prepositional_phrase(deprel: str, depth: int) -> tuple[list, list]:
        noun, words = noun_phrase(deprel, depth)
        adp = tree.add(concept("ADP"), "ADP", "case")
        adp[2] = noun
        return noun, ([adp, *words] if lang.adposition == "pre" else [*words, adp])

    transitive = rng.random() < 0.6
    verb = tree.add(concept("VERB_TR" if transitive else "VERB_INTR"), "VERB", "root")
    subject, subject_words = noun_phrase("nsubj", 0)
    subject[2] = verb
    parts = {"S": subject_words, "V": [verb]}
    order = lang.order
    if transitive:
        obj, object_words = noun_phrase("obj", 0)
        obj[2] = verb
        parts["O"] = object_words
    else:
        order = order.replace("O", "")
    words = [w for slot in order for w in parts[slot]]
    if rng.random() < 0.4:
        oblique, oblique_words = prepositional_phrase("obl", 0)
        oblique[2] = verb
        # obliques precede the verb in verb-final languages and close the clause in the others
        words = words[:-1] + oblique_words + words[-1:] if lang.order.endswith("V") else words + oblique_words
    punct = tree.add(".", "PUNCT", "punct")
    punct[2] = verb
    return [*words, punct]


def to_conllu(words: list, sent_id: str) -> str:
    """Render an ordered word list from [generate_sentence][subnets.data.synthetic.generate_sentence] as a
    CoNLL-U sentence."""
    index = {id(w): i + 1 for i, w in enumerate(words)}
    lines = [f"# sent_id = {sent_id}", f"# text = {' '.join(w[0] for w in words[:-1])}{words[-1][0]}"]
    for i, (form, upos, head, deprel) in enumerate(words, start=1):
        head_index = 0 if head is None else index[id(head)]
        misc = "SpaceAfter=No" if i == len(words) - 1 else "_"
        lines.append(f"{i}\t{form}\t_\t{upos}\t_\t_\t{head_index}\t{deprel}\t_\t{misc}")
    return "\n".join(lines) + "\n\n"


def generate_treebank(
    lang: SyntheticLanguage, lexicon: Mapping[tuple[str, int], str], size: int, seed: int, split: str
) -> str:
    """CoNLL-U text of ``size`` sentences of ``lang``; deterministic for (seed, code, split)."""
    return "".join(
        to_conllu(words, sent_id) for sent_id, words in _sentences(lang, lexicon, size, seed, split)
    )


def _sentences(
    lang: SyntheticLanguage, lexicon: Mapping[tuple[str, int], str], size: int, seed: int, split: str
):
    rng = random.Random(f"{seed}/{lang.code}/{split}")
    for i in range(size):
        yield f"{lang.code}-{split}-{i + 1}", generate_sentence(lang, lexicon, rng)


ROLES = {"nsubj": "SUBJ", "obj": "OBJ", "obl": "OBL"}


def role_spans(words: list) -> list[str]:
    """IOB2 tags of a sentence's argument spans: the whole subtree of the subject (``SUBJ``), the
    object (``OBJ``) and the oblique (``OBL``, its adposition included); the rest ``O``. The
    spans are contiguous, and finding them takes the language's word order: with shared forms,
    the first noun phrase is the subject in one language and the object in another."""
    heads = {id(w): w[2] for w in words}
    tags = []
    for word in words:
        node, role = word, None
        while node is not None and role is None:
            role = (
                ROLES.get(node[3]) if heads[id(node)] is not None and heads[id(node)][3] == "root" else None
            )
            node = heads[id(node)]
        tags.append(role)
    out, previous = [], None
    for tag in tags:
        out.append("O" if tag is None else ("I-" if tag == previous else "B-") + tag)
        previous = tag
    return out


def subject_class(words: list, concepts: Mapping[str, tuple[str, int]]) -> str:
    """A sentence's class: the subject noun's concept index modulo 3 (``c0``, ``c1``, ``c2``),
    which takes the word order to find."""
    subject = next(w for w in words if w[3] == "nsubj")
    return f"c{concepts[subject[0]][1] % 3}"


def task_variants(lang: SyntheticLanguage, lexicon: Mapping[tuple[str, int], str], size: int, seed: int,
                  split: str) -> dict[str, str]:  # fmt: skip
    """The same sentences as [generate_treebank][subnets.data.synthetic.generate_treebank], as a
    token-classification file (CoNLL columns, [role_spans][subnets.data.synthetic.role_spans]; suffix
    ``.conll``) and a sentence-classification file (JSON lines,
    [subject_class][subnets.data.synthetic.subject_class]; suffix ``.jsonl``), keyed by suffix."""
    import json

    concepts = {form: concept for concept, form in lexicon.items()}
    conll, jsonl = [], []
    for sent_id, words in _sentences(lang, lexicon, size, seed, split):
        conll.append("".join(f"{w[0]}\t{t}\n" for w, t in zip(words, role_spans(words))) + "\n")
        text = " ".join(w[0] for w in words)
        jsonl.append(
            json.dumps({"id": sent_id, "text": text, "label": subject_class(words, concepts)}) + "\n"
        )
    return {".conll": "".join(conll), ".jsonl": "".join(jsonl)}


def write_synthetic_treebanks(
    root: str | os.PathLike,
    languages: Mapping[str, SyntheticLanguage],
    sizes: Mapping[str, int],
    seed: int = 0,
) -> Path:
    """Write ``root/<code>/<split>.conllu`` for every language and split, and beside it the same
    sentences for token classification (``.conll``) and sentence classification (``.jsonl``,
    [task_variants][subnets.data.synthetic.task_variants]); returns ``root``.

    ``sizes`` maps split names (``train``, ``dev``, ``test``) to numbers of sentences; a split
    of size 0 is not written. Existing files with the same content are left untouched.
    """
    root = Path(root)
    lexicons = build_lexicons(languages, seed)
    for code, lang in languages.items():
        for split, size in sizes.items():
            if size <= 0:
                continue
            files = {".conllu": generate_treebank(lang, lexicons[code], size, seed, split),
                     **task_variants(lang, lexicons[code], size, seed, split)}  # fmt: skip
            for suffix, text in files.items():
                path = root / code / f"{split}{suffix}"
                if not path.exists() or path.read_text(encoding="utf-8") != text:
                    atomic_write_text(path, text)
    return root
