"""advbct: backward-compatible embedding model upgrades for image retrieval (AdvBCT and baselines)."""

__version__ = "0.1.0"
