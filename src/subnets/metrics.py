"""UAS, LAS and UPOS accuracy as the CoNLL 2018 shared-task scorer computes them.

On gold tokenization (the only case the parser produces) the scorer's word alignment is the
identity, and its scores reduce to: every syntactic word counts, punctuation included; UAS
counts words whose head is right; LAS words whose head and universal relation (DEPREL before
any ``:``) are right; UPOS words whose tag is right. Scores are percentages of the gold words.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from subnets.data.labels import universal_deprel
from subnets.data.treebank import Sentence, read_conllu


def attachment_scores(
    gold: Sequence[Sentence],
    heads: Sequence[Sequence[int]] | None = None,
    deprels: Sequence[Sequence[str]] | None = None,
    upos: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Scores of predicted ``heads``/``deprels`` (and/or ``upos``) against ``gold`` sentences.

    Returns ``words`` (the denominator) and, for what was predicted, ``uas``, ``las``, ``upos``
    in percent.
    """
    words = sum(len(s) for s in gold)
    if words == 0:
        raise ValueError("no gold words to score")
    for name, values in (("heads", heads), ("deprels", deprels), ("upos", upos)):
        if values is not None and len(values) != len(gold):
            raise ValueError(f"{len(values)} sentences of predicted {name} for {len(gold)} gold sentences")
    counts = {"uas": 0, "las": 0, "upos": 0}
    for i, sentence in enumerate(gold):
        n = len(sentence)
        for name, values in (("heads", heads), ("deprels", deprels), ("upos", upos)):
            if values is not None and len(values[i]) != n:
                raise ValueError(
                    f"sentence {sentence.sent_id}: {len(values[i])} predicted {name} for {n} words"
                )
        for j in range(n):
            if heads is not None and heads[i][j] == sentence.heads[j]:
                counts["uas"] += 1
                if deprels is not None and universal_deprel(deprels[i][j]) == universal_deprel(
                    sentence.deprels[j]
                ):
                    counts["las"] += 1
            if upos is not None and upos[i][j] == sentence.upos[j]:
                counts["upos"] += 1
    scores: dict[str, float] = {"words": words}
    if heads is not None:
        scores["uas"] = 100.0 * counts["uas"] / words
    if heads is not None and deprels is not None:
        scores["las"] = 100.0 * counts["las"] / words
    if upos is not None:
        scores["upos"] = 100.0 * counts["upos"] / words
    return scores


def score_conllu(gold_path: str | os.PathLike, system_path: str | os.PathLike) -> dict[str, float]:
    """Score a system CoNLL-U file against the gold one (same sentences and words required)."""
    gold = read_conllu(gold_path).examples
    system = read_conllu(system_path).examples
    if len(gold) != len(system):
        raise ValueError(f"{system_path}: {len(system)} sentences, but {gold_path} has {len(gold)}")
    for g, s in zip(gold, system):
        if g.forms != s.forms:
            raise ValueError(
                f"{s.source}: words of sentence {s.sent_id} differ from the gold sentence at {g.source} "
                "(this scorer needs gold tokenization)"
            )
    return attachment_scores(
        gold, [s.heads for s in system], [s.deprels for s in system], [s.upos for s in system]
    )
