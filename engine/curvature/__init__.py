"""Curvature in the projected space: identity, diagonal, K-FAC and EK-FAC, from mergeable sums."""
