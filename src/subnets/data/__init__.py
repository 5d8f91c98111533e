"""Data: examples and their files, CoNLL-U treebanks, language discovery, synthetic languages,
sampling and batching."""

from subnets.data.batching import Batch, Collator, LabelledBatch, WordCollator, encode_words, plan_windows
from subnets.data.discovery import LanguageFiles, discover_languages, select_languages
from subnets.data.examples import DataError, ExampleFile
from subnets.data.sampling import LanguageSampler, language_probabilities
from subnets.data.synthetic import SyntheticLanguage, write_synthetic_treebanks
from subnets.data.treebank import ConlluError, Sentence, parse_conllu, read_conllu, write_conllu

__all__ = [
    "Batch",
    "Collator",
    "ConlluError",
    "DataError",
    "ExampleFile",
    "LabelledBatch",
    "LanguageFiles",
    "LanguageSampler",
    "Sentence",
    "SyntheticLanguage",
    "WordCollator",
    "discover_languages",
    "encode_words",
    "language_probabilities",
    "parse_conllu",
    "plan_windows",
    "read_conllu",
    "select_languages",
    "write_conllu",
    "write_synthetic_treebanks",
]
