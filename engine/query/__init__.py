"""Answering attribution queries: query gradients, the spectral transform, streaming scores, top-k."""
