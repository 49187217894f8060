"""projection: the per-module projection of each gradient."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from engine.config.section import Section as _Section


class ProjectionBudget(_Section):
    numbers_per_row: int = Field(gt=0, description="stored numbers per row, split over the modules")
    measured_on: str | None = Field(
        default=None,
        description="a store with full-width factors (`exact: {factors: true}`, or projection.dim 0) of the same "
        "model and modules: its Λ gives each module's effective dimension Σ Λ/(Λ+λ), by which the budget is split. "
        "Default: measured by `tributary index` itself, from the K-FAC eigenvalues of a fit pass over the rows "
        "(kept beside the store, at store.path + '.budget')",
    )
    fit_rows: int | None = Field(
        default=None,
        gt=0,
        description="without measured_on: measure on about this many rows (every ⌈N/fit_rows⌉-th row), so the "
        "fit pass costs a fraction of a pass; default all rows",
    )

    @model_validator(mode="after")
    def _measured_or_fitted(self) -> ProjectionBudget:
        if self.fit_rows is not None and self.measured_on is not None:
            raise PydanticCustomError(
                "projection_options", "fit_rows is for a budget the index measures itself; remove it or measured_on"
            )
        return self


class ProjectionConfig(_Section):
    dim: int = Field(default=16, ge=0, description="per-side projection width k; 0 = identity (exact)")
    seed: int = 0
    kind: Literal["rademacher", "gaussian", "kfac_eigen", "eigen_sketch", "grad_pca", "grad_pca_whitened"] = Field(
        default="rademacher",
        description="rademacher/gaussian: seeded random matrices; kfac_eigen: each side's top-k eigenvectors of "
        "its K-FAC covariance (fitted by a pass before the gradients); eigen_sketch: the top `top` eigenvectors "
        "and a seeded random sketch of their orthogonal complement; grad_pca: each side's top-k eigenvectors of the "
        "training rows' own per-example gradients, Σ_n G_nᵀ G_n and Σ_n G_n G_nᵀ (in-sample, fitted by a pass); "
        "grad_pca_whitened: the same of the K-FAC-whitened gradients S^-1/2 G A^-1/2 (two sweeps over the fit rows; "
        "engine.projection.whitened)",
    )
    fit_rows: int | None = Field(
        default=None,
        gt=0,
        description="kfac_eigen/eigen_sketch: fit the covariances on about this many rows (every ⌈N/fit_rows⌉-th "
        "row); default all rows",
    )
    top: int | None = Field(
        default=None,
        gt=0,
        description="eigen_sketch: eigen-directions kept per side (the rest of dim is the sketch); default dim // 2",
    )
    fit: Literal["exact", "sketch"] = Field(
        default="exact",
        description="kfac_eigen/eigen_sketch: how each side's eigenvectors are found. exact: from the full d x d "
        "covariance (d² products per token, d² floats per module and shard); sketch: from a one-pass Nyström "
        "sketch of width 4 x the eigenvectors kept (4kd products and floats), exact where that is not narrower",
    )

    budget: ProjectionBudget | None = Field(
        default=None,
        description="in place of dim: numbers_per_row split over the modules by effective dimension (random kinds; "
        "engine.projection.budget)",
    )

    @model_validator(mode="after")
    def _fitted_options(self) -> ProjectionConfig:
        if self.budget is not None and "dim" in self.model_fields_set:
            raise PydanticCustomError("projection_options", "budget replaces dim; remove one of them")
        if self.budget is not None and self.kind not in ("rademacher", "gaussian"):
            raise PydanticCustomError("projection_options", "budget is for kind rademacher or gaussian")
        fitted = self.kind in ("kfac_eigen", "eigen_sketch", "grad_pca", "grad_pca_whitened")
        if not fitted and (self.fit_rows is not None or self.top is not None or self.fit != "exact"):
            raise PydanticCustomError(
                "projection_options",
                "fit_rows, top and fit are for kind kfac_eigen or eigen_sketch (fit_rows and fit also for grad_pca and grad_pca_whitened); remove "
                "them or change projection.kind",
            )
        if self.top is not None and self.kind != "eigen_sketch":
            raise PydanticCustomError("projection_options", "top is for kind eigen_sketch; remove it")
        if self.top is not None and self.dim and self.top >= self.dim:
            raise PydanticCustomError(
                "projection_options", "top must be below dim (the rest of each side is the random sketch)"
            )
        return self
