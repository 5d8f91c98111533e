"""Training methods (baseline, static and dynamic subnetworks, meta-learning)."""

from subnets.methods.base import Method, build_method
from subnets.methods.subnetworks import StaticSubnetworks, SubnetworkMethod

__all__ = ["Method", "StaticSubnetworks", "SubnetworkMethod", "build_method"]
