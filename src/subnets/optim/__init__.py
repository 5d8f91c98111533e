"""Optimizers: exact masked updates around any torch optimizer."""

from subnets.optim.masked import MaskedOptimizer, UpdateMask

__all__ = ["MaskedOptimizer", "UpdateMask"]
