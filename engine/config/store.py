"""store: where the gradient store is written and in what dtype and chunks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config.section import Section as _Section


class StoreConfig(_Section):
    path: str
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    rows_per_chunk: int | None = Field(
        default=None,
        gt=0,
        description="rows per Zarr chunk (a shard); default ~16 MiB, at least data.batch_size rows, and for "
        "K-FAC/EK-FAC/diagonal enough batches that the shard's partial sums are a quarter of its rows (to 512 MiB)",
    )
    keep_fisher_grads: bool = Field(
        default=False,
        description="keep the sampled-label rows (fisher_grads) pass 1 writes for Λ once the factors are final "
        "(a training run's segment Λ then reads them instead of running the model again)",
    )
