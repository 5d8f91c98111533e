"""Subnetworks: importance scores, selection, mask objects and their I/O."""

from subnets.masks.importance import (
    finetuned_copy,
    fisher_information,
    fisher_per_unit,
    normalize_importance,
    unit_importance,
)
from subnets.masks.lora import lora_adapter, save_lora_adapters
from subnets.masks.search import SubnetworkSearch, find_subnetwork, matching_parameters
from subnets.masks.selection import (
    PruningResult,
    iterative_pruning,
    prune_lowest,
    select_keep_ratio,
    select_parameters,
    select_top_k,
)
from subnets.masks.subnetwork import MaskMismatchError, Subnetwork, SubnetworkSet, unit_parameter_masks

__all__ = [
    "MaskMismatchError", "PruningResult", "Subnetwork", "SubnetworkSearch", "SubnetworkSet", "find_subnetwork",
    "finetuned_copy", "fisher_information", "fisher_per_unit", "unit_importance", "unit_parameter_masks",
    "iterative_pruning", "matching_parameters", "normalize_importance", "prune_lowest", "select_keep_ratio",
    "select_parameters", "select_top_k", "lora_adapter", "save_lora_adapters",
]  # fmt: skip
