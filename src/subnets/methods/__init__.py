"""Training methods (baseline, static and dynamic subnetworks, meta-learning)."""

from subnets.methods.base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
