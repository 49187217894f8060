"""Device-independent random projections, two-sided per module (LoGra-style)."""

from engine.projection.projector import ModuleProjection, ProjectionSpec, build_projection, projection_matrix

__all__ = ["ModuleProjection", "ProjectionSpec", "build_projection", "projection_matrix"]
