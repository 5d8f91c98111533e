"""Data: CoNLL-U treebanks, UD discovery, synthetic languages, sampling and batching."""

from subnets.data.batching import Batch, Collator, encode_words, plan_windows
from subnets.data.sampling import LanguageSampler, language_probabilities
from subnets.data.synthetic import SyntheticLanguage, write_synthetic_treebanks
from subnets.data.treebank import ConlluError, ConlluFile, Sentence, parse_conllu, read_conllu, write_conllu
from subnets.data.ud import TreebankFiles, discover_treebanks, select_treebanks

__all__ = [
    "Batch",
    "Collator",
    "ConlluError",
    "ConlluFile",
    "LanguageSampler",
    "Sentence",
    "SyntheticLanguage",
    "TreebankFiles",
    "discover_treebanks",
    "encode_words",
    "language_probabilities",
    "parse_conllu",
    "plan_windows",
    "read_conllu",
    "select_treebanks",
    "write_conllu",
    "write_synthetic_treebanks",
]
