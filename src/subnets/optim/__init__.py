"""Optimizers: exact masked updates around any torch optimizer."""

from subnets.optim.masked import MaskedOptimizer

__all__ = ["MaskedOptimizer"]
