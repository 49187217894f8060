"""exact: full-width factors and the streamed exact pass (`tributary query --exact`, `--rescore K`)."""

from __future__ import annotations

from pydantic import Field

from engine.config.section import Section as _Section


class ExactConfig(_Section):
    """Exact EK-FAC/K-FAC without rows at full width: `tributary query --exact` and `--rescore K`."""

    factors: bool = Field(
        default=False, description="tributary index also fits the curvature factors at full width (for --exact)"
    )
    query_rank: int | None = Field(
        default=None,
        gt=0,
        description="--exact: keep each preconditioned query gradient's top r singular directions per module; "
        "null keeps its full rank",
    )
