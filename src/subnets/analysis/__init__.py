"""Analyses of a run: gradient conflict between languages, subnetwork overlap against
typology, and representation similarity (linear CKA). Each is a plain function usable on any
model or run folder; [subnets.report][] draws them for a whole study."""

from subnets.analysis.conflict import (
    conflict_matrix,
    cosine_matrix,
    language_gradients,
    load_conflict,
    negative_share,
    shared_parameters,
)
from subnets.analysis.similarity import (
    cka_matrix,
    linear_cka,
    load_cka,
    parallel_sentence_ids,
    sentence_representations,
)
from subnets.analysis.typology import overlap_typology_correlation, typological_similarity, uriel_code

__all__ = [
    "cka_matrix",
    "conflict_matrix",
    "cosine_matrix",
    "language_gradients",
    "linear_cka",
    "load_cka",
    "load_conflict",
    "negative_share",
    "overlap_typology_correlation",
    "parallel_sentence_ids",
    "sentence_representations",
    "shared_parameters",
    "typological_similarity",
    "uriel_code",
]
