"""subnets: language-specific subnetworks for cross-lingual transfer."""

__version__ = "0.1.0"
