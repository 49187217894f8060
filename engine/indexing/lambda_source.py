"""Where an index's Λ (EK-FAC's corrected eigenvalues, diagonal's variances) comes from.

- "store": pass 1 already computed every G̃_n that Λ = Σ_n (Q_Sᵀ G̃_n Q_A)² needs: with `fisher: empirical` the
  stored rows themselves, with the true Fisher the sampled-label rows of the covariance backward, which pass 1
  then writes as a second array (`fisher_grads`). Λ is a read of the store after the eigendecomposition.
- "model": a second forward and backward per row (the two-pass index), for stores whose rows are rounded
  (float16/bfloat16 store.dtype: Λ from rounded rows differs from Λ of the computed gradients by about the
  dtype's precision, ~1e-3 relative) or where a second full-width array would be large (dim 0, true Fisher).

A pure function of the config and the store's size, so the driver and every worker decide alike.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from engine.config import JobConfig
from engine.curvature.factors import NEEDS_LAMBDA_PASS
from engine.store.encoding import PHYSICAL

LOSSY_STORE_DTYPES = ("float16", "bfloat16")
FISHER_ROWS_LIMIT_BYTES = 16 << 30  # auto: above this a dim-0 fisher_grads array is not worth the disk

LambdaSource = Literal["store", "model"]


def lambda_source(config: JobConfig, rows: int, width: int) -> LambdaSource:
    """ "store" or "model" for a store of `rows` rows of `width` columns (curvature.lambdas, resolved)."""
    setting = config.curvature.lambdas
    if setting != "auto":
        return setting
    if config.store.dtype in LOSSY_STORE_DTYPES:
        return "model"
    second_array = rows * width * np.dtype(PHYSICAL[config.store.dtype]).itemsize
    if config.curvature.fisher is True and config.projection.dim == 0 and second_array > FISHER_ROWS_LIMIT_BYTES:
        return "model"
    return "store"


def writes_fisher_rows(config: JobConfig, rows: int, width: int) -> bool:
    """Whether pass 1 writes `fisher_grads`: the true Fisher with Λ read from the store."""
    return (
        config.curvature.strategy in NEEDS_LAMBDA_PASS
        and config.curvature.fisher is True
        and lambda_source(config, rows, width) == "store"
    )
