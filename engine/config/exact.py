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
    factor_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="the full-width Λ pass: modules in layout order cut into the fewest groups whose float64 "
        "factors fit this many GB; each group is a pass over the rows whose actors hold its modules' bases only "
        "(as kronfluence's module partitions); null: one group",
    )
