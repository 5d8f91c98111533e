"""Reading, validating and writing CoNLL-U treebanks.

Files are parsed with the ``conllu`` package into [Sentence][subnets.data.treebank.Sentence] objects that hold
what the parser needs (forms, UPOS, heads, relations of the syntactic words) and keep the whole token list,
multiword-token lines and empty nodes included, so that predictions can be written back in place.

Every sentence is validated before it is used. A problem raises
[ConlluError][subnets.data.treebank.ConlluError], whose message names the file, the line and the sentence id,
or, with ``on_error="skip"``, the sentence is left out and the error is kept in ``ExampleFile.skipped`` so
that the caller can report it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import conllu

from subnets.data.examples import ON_ERROR, DataError, ExampleFile, read_utf8
from subnets.data.labels import DEPREL_INDEX, UPOS_INDEX, universal_deprel
from subnets.files import atomic_write_text

_WORD_ID = re.compile(r"[1-9][0-9]*\Z")
_RANGE_ID = re.compile(r"[1-9][0-9]*-[1-9][0-9]*\Z")
_EMPTY_ID = re.compile(r"[0-9]+\.[1-9][0-9]*\Z")


class ConlluError(DataError):
    """A CoNLL-U problem, located by file, line (1-based) and sentence id."""


@dataclass
class Sentence:
    """One sentence's syntactic words (multiword tokens and empty nodes are not words).

    ``heads[i]`` is the 1-based index of word ``i + 1``'s head, 0 for the root.
    ``tokens`` holds every token of the sentence as parsed by ``conllu`` (typed fields,
    metadata); ``lines`` its original text lines, from which predictions are written back.
    """

    sent_id: str
    forms: list[str]
    upos: list[str]
    heads: list[int]
    deprels: list[str]
    tokens: conllu.TokenList | None = field(default=None, repr=False)
    lines: list[str] | None = field(default=None, repr=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.forms)

    def annotated(
        self,
        heads: Sequence[int] | None = None,
        deprels: Sequence[str] | None = None,
        upos: Sequence[str] | None = None,
        blank: Sequence[int] = (),
    ) -> Sentence:
        """This sentence with HEAD, DEPREL or UPOS replaced where given and ``_`` in the word
        lines' columns ``blank`` (0-based: 2 LEMMA, 3 UPOS, 4 XPOS, 5 FEATS, 8 DEPS); its
        ``lines`` are rewritten to match, every other line and column kept byte for byte
        (``tokens`` is not carried over)."""
        replacements = [(column, values) for column, values in ((3, upos), (6, heads), (7, deprels))
                        if values is not None]  # fmt: skip
        for _, values in replacements:
            if len(values) != len(self):
                raise ValueError(
                    f"sentence {self.sent_id}: {len(values)} predicted values for {len(self)} words"
                )
        lines, word = [], 0
        for line in self.lines if self.lines is not None else _lines(self):
            columns = line.split("\t")
            if not line.startswith("#") and _WORD_ID.match(columns[0]):
                for column in blank:
                    columns[column] = "_"
                for column, values in replacements:
                    columns[column] = str(values[word])
                word += 1
            lines.append("\t".join(columns))
        return Sentence(
            self.sent_id, list(self.forms), list(upos if upos is not None else self.upos),
            list(heads if heads is not None else self.heads), list(deprels if deprels is not None else self.deprels),
            None, lines, self.source,
        )  # fmt: skip


def read_conllu(path: str | os.PathLike, on_error: str = "raise", trees: bool = True) -> ExampleFile:
    """Read and validate a CoNLL-U file.

    Args:
        path: the file.
        on_error: ``"raise"`` raises [ConlluError][subnets.data.treebank.ConlluError] at the first invalid
            sentence; ``"skip"`` leaves invalid sentences out and lists their errors in ``skipped``.
        trees: ``False`` reads text to be parsed: only the format is checked (ten columns,
            word IDs, non-empty FORM); HEAD, DEPREL and UPOS may hold anything (``_``), and the
            sentences get placeholder heads (0) and relations (``dep``).

    Returns the valid [Sentence][subnets.data.treebank.Sentence] objects (``examples``) and the skipped ones'
    errors.

    The file must be UTF-8; a leading byte-order mark is accepted (and dropped).

    Raises:
        ConlluError: an invalid sentence (with ``on_error="raise"``), a file with no valid
            sentence at all (in both modes), or bytes that are not UTF-8 (their line named).
    """
    return parse_conllu(read_utf8(path, "CoNLL-U", ConlluError), path, on_error, trees)


def unparsed(sent_id: str, forms: list[str], upos: list[str] | None = None, lines: list[str] | None = None,
             source: str = "") -> Sentence:  # fmt: skip
    """A sentence to be parsed: its words, with placeholder heads (0) and relations (``dep``)."""
    n = len(forms)
    return Sentence(
        sent_id, forms, upos if upos is not None else ["_"] * n, [0] * n, ["dep"] * n, None, lines, source
    )


def parse_conllu(
    text: str, path: str | os.PathLike = "<string>", on_error: str = "raise", trees: bool = True
) -> ExampleFile:
    """Validate and parse CoNLL-U ``text`` (as [read_conllu][subnets.data.treebank.read_conllu]); ``path`` is
    used in error messages only."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    sentences, skipped = [], []
    for number, (first_line, lines) in enumerate(_blocks(text), start=1):
        try:
            sentences.append(_parse_sentence(lines, first_line, number, path, trees))
        except ConlluError as error:
            if on_error == "raise":
                raise
            skipped.append(error)
    if not sentences:
        problem = "no valid sentence" if skipped else "the file holds no sentence"
        raise ConlluError(path, 1, None, problem + " (expected blank-line separated CoNLL-U sentences)")
    return ExampleFile(Path(path), sentences, skipped)


def _blocks(text: str):
    """Yield (line number of the first line, lines) for each blank-line separated block."""
    block, start = [], 0
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: only \n ends a line
        line = line.rstrip("\r")
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield start, block
            block = []
    if block:
        yield start, block


def _parse_sentence(lines: list[str], first_line: int, number: int, path, trees: bool = True) -> Sentence:
    sent_id = next((ln.split("=", 1)[1].strip() for ln in lines if re.match(r"#\s*sent_id\s*=", ln)), None)
    name = sent_id or f"#{number}"

    def fail(offset: int, problem: str):
        raise ConlluError(path, first_line + offset, name, problem)

    word_lines: list[tuple[int, list[str]]] = []
    for offset, line in enumerate(lines):
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) != 10:
            fail(offset, f"expected 10 tab-separated columns, found {len(columns)}")
        token_id = columns[0]
        if not columns[1]:
            fail(offset, "empty FORM (the official scorer rejects it; write '_' for an unknown form)")
        if _WORD_ID.match(token_id):
            expected = len(word_lines) + 1
            if int(token_id) != expected:
                fail(offset, f"word ID {token_id} out of sequence (expected {expected})")
            word_lines.append((offset, columns))
        elif not (_RANGE_ID.match(token_id) or _EMPTY_ID.match(token_id)):
            fail(offset, f"ID {token_id!r} is not a word index, a range (3-4) or an empty node (3.1)")
    if not word_lines:
        fail(0, "sentence has no word lines")
    if not trees:
        return unparsed(name, [columns[1] for _, columns in word_lines], [columns[3] for _, columns in word_lines],
                        lines, f"{path}:{first_line}")  # fmt: skip

    n = len(word_lines)
    heads = []
    for offset, columns in word_lines:
        head = columns[6]
        if not re.fullmatch(r"[0-9]+", head):
            fail(offset, f"HEAD {head!r} is not an integer")
        if int(head) > n:
            fail(offset, f"HEAD {head} out of range (the sentence has {n} words; expected 0..{n})")
        if columns[3] not in UPOS_INDEX and columns[3] != "_":
            fail(offset, f"UPOS {columns[3]!r} is not a universal POS tag (or '_', unspecified)")
        if universal_deprel(columns[7]) not in DEPREL_INDEX:
            fail(offset, f"DEPREL {columns[7]!r} is not a universal dependency relation")
        heads.append(int(head))

    roots = [i for i, h in enumerate(heads) if h == 0]
    if not roots:
        fail(word_lines[0][0], "no root: no word has HEAD 0 (expected exactly one)")
    if len(roots) > 1:
        fail(
            word_lines[roots[1]][0],
            f"several roots: words {', '.join(str(r + 1) for r in roots)} have HEAD 0",
        )
    cycle = _find_cycle(heads)
    if cycle:
        path_text = " -> ".join(str(w) for w in [*cycle, cycle[0]])
        fail(word_lines[cycle[0] - 1][0], f"cycle in the tree: {path_text} (HEAD chain never reaches 0)")

    try:
        tokens = conllu.parse("\n".join(lines) + "\n\n")[0]
    except conllu.exceptions.ParseException as error:
        fail(0, f"conllu could not parse the sentence: {error}")
    words = [t for t in tokens if isinstance(t["id"], int)]
    return Sentence(
        sent_id=name,
        forms=[t["form"] for t in words],
        upos=[t["upos"] for t in words],
        heads=[t["head"] for t in words],
        deprels=[t["deprel"] for t in words],
        tokens=tokens,
        lines=lines,
        source=f"{path}:{first_line}",
    )


def _find_cycle(heads: Sequence[int]) -> list[int] | None:
    """A cycle of 1-based word indices in ``heads``, or None if every chain reaches 0."""
    state = [0] * (len(heads) + 1)  # 0 unvisited, 1 on the current chain, 2 known to reach the root
    state[0] = 2
    for start in range(1, len(heads) + 1):
        chain, node = [], start
        while state[node] == 0:
            state[node] = 1
            chain.append(node)
            node = heads[node - 1]
        if state[node] == 1:
            return chain[chain.index(node) :]
        for visited in chain:
            state[visited] = 2
    return None


def write_conllu(
    path: str | os.PathLike,
    sentences: Sequence[Sentence],
    heads: Sequence[Sequence[int]] | None = None,
    deprels: Sequence[Sequence[str]] | None = None,
    upos: Sequence[Sequence[str]] | None = None,
    blank: Sequence[int] = (),
) -> Path:
    """Write ``sentences`` as CoNLL-U (atomically), replacing HEAD, DEPREL or UPOS where given
    and writing ``_`` in the word lines' columns ``blank`` (0-based: 2 LEMMA, 3 UPOS, 4 XPOS,
    5 FEATS, 8 DEPS), so that a prediction file carries no gold value it did not predict.

    Every other line and column (comments, multiword tokens, empty nodes, MISC) is written byte
    for byte as it was read, so the official scorer can compare the file with the gold one.
    (The ``conllu`` serializer is not used: it drops free-form comments and cuts MISC values
    that contain ``=``.)
    """
    parts = []
    for index, sentence in enumerate(sentences):
        predicted = [None if values is None else values[index] for values in (heads, deprels, upos)]
        parts.extend(line + "\n" for line in sentence.annotated(*predicted, blank=blank).lines)
        parts.append("\n")
    return atomic_write_text(path, "".join(parts))


def _lines(sentence: Sentence) -> list[str]:
    """CoNLL-U lines for a sentence built in code (no lines read from a file)."""
    rows = zip(sentence.forms, sentence.upos, sentence.heads, sentence.deprels)
    return [f"# sent_id = {sentence.sent_id}"] + [
        f"{i}\t{form}\t_\t{tag}\t_\t_\t{head}\t{rel}\t_\t_"
        for i, (form, tag, head, rel) in enumerate(rows, 1)
    ]


def read_tokenized_text(path: str | os.PathLike) -> list[Sentence]:
    """Sentences of a plain-text file with one pre-tokenized sentence per line (tokens separated
    by whitespace; blank lines are skipped), to be parsed; sentence ids are the line numbers."""
    path = Path(path)
    text = read_utf8(path, "text", ConlluError)
    sentences = []
    for number, line in enumerate(text.split("\n"), start=1):
        forms = line.split()
        if not forms:
            continue
        lines = [f"# sent_id = {number}", f"# text = {' '.join(forms)}"]
        lines += [f"{i}\t{form}\t_\t_\t_\t_\t0\tdep\t_\t_" for i, form in enumerate(forms, 1)]
        sentences.append(unparsed(str(number), forms, lines=lines, source=f"{path}:{number}"))
    if not sentences:
        raise ConlluError(
            path, 1, None, "the file holds no sentence (expected one tokenized sentence per line)"
        )
    return sentences
