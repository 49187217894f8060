"""curvature: the Hessian approximation and where its eigenvalues come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from engine.config.section import Section as _Section


class CurvatureConfig(_Section):
    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = "ekfac"
    fisher: Literal[True, "empirical"] = Field(
        default=True, description="true: labels sampled from the model (Gauss-Newton); empirical: the data's labels"
    )
    seed: int = 0
    lambdas: Literal["auto", "store", "model"] = Field(
        default="auto",
        description="where EK-FAC/diagonal Λ comes from: store (a read of the stored rows, or of the sampled-label "
        "rows pass 1 wrote as fisher_grads), model (a second forward+backward), auto (store unless store.dtype "
        "is float16/bfloat16 or, with the true Fisher, projection.dim is 0: fisher_grads would copy the full rows)",
    )

    @field_validator("fisher", mode="before")
    @classmethod
    def _fisher_words(cls, value: object) -> object:
        if value == "true":
            return True
        if value is False or value == "false":
            raise ValueError("fisher must be true (sampled labels) or 'empirical'")
        return value
