"""Gradients of a language model: the loaded model context, and the passes over tokenised rows that indexing
and queries share (projected per-example gradients with covariance sums, per-token gradients, Λ sums)."""
