"""Device-independent random projections, two-sided per module (LoGra-style), and curvature-aware ones fitted
to the data (engine.projection.fitted)."""

from engine.projection.projector import (
    FITTED_KINDS,
    ModuleProjection,
    ProjectionSpec,
    build_projection,
    projection_matrix,
)

__all__ = ["FITTED_KINDS", "ModuleProjection", "ProjectionSpec", "build_projection", "projection_matrix"]
