"""Fixed label inventories of Universal Dependencies v2.

The parser predicts universal relations (the part of DEPREL before ':') and universal POS tags.
Fixed inventories keep checkpoints and masks portable across treebanks and unseen languages.
"""

UPOS = (
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM",
    "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X",
)  # fmt: skip

DEPRELS = (
    "acl", "advcl", "advmod", "amod", "appos", "aux", "case", "cc", "ccomp", "clf",
    "compound", "conj", "cop", "csubj", "dep", "det", "discourse", "dislocated", "expl",
    "fixed", "flat", "goeswith", "iobj", "list", "mark", "nmod", "nsubj", "nummod", "obj",
    "obl", "orphan", "parataxis", "punct", "reparandum", "root", "vocative", "xcomp",
)  # fmt: skip

UPOS_INDEX = {tag: i for i, tag in enumerate(UPOS)}
DEPREL_INDEX = {rel: i for i, rel in enumerate(DEPRELS)}
ROOT_DEPREL = DEPREL_INDEX["root"]


def universal_deprel(deprel: str) -> str:
    """The universal part of a dependency relation (``nmod:poss`` -> ``nmod``)."""
    return deprel.split(":", 1)[0]
