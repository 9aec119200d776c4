"""bise: Bias-Invariant Subnetwork Extraction (BISE) experiment runner."""

__version__ = "0.1.0"
