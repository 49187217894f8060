"""Answering attribution queries: query gradients, the spectral transform, streaming scores by row range, top-k."""
