"""Tributary: training-data attribution for large models (Source and FiMO on one spectral core)."""

__version__ = "0.1.0"
