"""Where an index's Λ (EK-FAC's corrected eigenvalues, diagonal's variances) comes from.

- "store": pass 1 already computed every G̃_n that Λ = Σ_n (Q_Sᵀ G̃_n Q_A)² needs: with `fisher: empirical` the
  stored rows themselves, with the true Fisher the sampled-label rows of the covariance backward, which pass 1
  then writes as a second array (`fisher_grads`). Λ is a read of the store after the eigendecomposition.
- "model": a second forward and backward per row (the two-pass index), for stores whose rows are rounded
  (float16/bfloat16 store.dtype: Λ from rounded rows differs from Λ of the computed gradients by about the
  dtype's precision, ~1e-3 relative) and for the true Fisher at full width (dim 0). There `fisher_grads`
  would be a second copy of the full rows, written and read back, and rotating a stored row costs
  k_in·k_out·(k_in + k_out) a module where the model pass rotates its T tokens for T·(k_in² + k_out²):
  on issue 13's workload the model pass took 15.4× bare against the store read's 17.1×
  (benchmarks/results/index_throughput_exact_paths.json).

A pure function of the config, so the driver and every worker decide alike.
"""

from __future__ import annotations

from typing import Literal

from engine.config import JobConfig
from engine.curvature.factors import NEEDS_LAMBDA_PASS

LOSSY_STORE_DTYPES = ("float16", "bfloat16")

LambdaSource = Literal["store", "model"]


def lambda_source(config: JobConfig) -> LambdaSource:
    """ "store" or "model": curvature.lambdas, resolved."""
    setting = config.curvature.lambdas
    if setting != "auto":
        return setting
    if config.store.dtype in LOSSY_STORE_DTYPES:
        return "model"
    if config.curvature.fisher is True and config.projection.dim == 0:
        return "model"
    return "store"


def writes_fisher_rows(config: JobConfig) -> bool:
    """Whether pass 1 writes `fisher_grads`: the true Fisher with Λ read from the store."""
    return (
        config.curvature.strategy in NEEDS_LAMBDA_PASS
        and config.curvature.fisher is True
        and lambda_source(config) == "store"
    )
