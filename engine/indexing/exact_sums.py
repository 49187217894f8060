"""`exact: {factors: true}` on a randomly projected store: pass 1 also sums the full-width K-FAC covariances.

The capture then runs at full width and each batch is projected in the pass (engine.gradients.passes), so the
store's rows are the numbers an index without exact.factors writes, and the full-width factors need no
covariance pass of their own (engine.exact.fit reads these sums). Each shard writes its sums beside pass 1's as
partials under PASS_ONE_EXACT; the driver creates that array only before pass 1's first shard, and a worker
writes to it wherever it exists, so a resumed index never holds sums of only some shards.
"""

from __future__ import annotations

from engine.config import JobConfig
from engine.curvature.packing import covariance_counts, covariance_width
from engine.projection import ProjectionSpec
from engine.projection.fitted import full_width
from engine.store import GradientStore

PASS_ONE_EXACT = "pass1_exact_covariance"


def fuses_exact_covariance(config: JobConfig, spec: ProjectionSpec) -> bool:
    """Whether pass 1 sums the full-width covariances: exact factors wanted, K-FAC/EK-FAC, a random projection
    (dim 0's pass-1 sums are full width already; a fitted kind's fitting pass gives them where it covers every
    row), on placements that capture in one process (a zero3 group runs the exact covariance stage instead)."""
    return (
        config.exact.factors
        and config.curvature.strategy in ("kfac", "ekfac")
        and config.training_run is None
        and config.placement.kind != "zero3"
        and spec.dim != 0
        and not spec.fitted
    )


def create_pass_one_sums(config: JobConfig, store: GradientStore, spec: ProjectionSpec) -> None:
    """The partials array of pass 1's full-width sums, before pass 1's first shard only."""
    if fuses_exact_covariance(config, spec) and not store.manifest.shards.get("gradients"):
        full = full_width(spec)
        store.create_partials(PASS_ONE_EXACT, covariance_width(full), covariance_counts(full))


def has_pass_one_sums(store: GradientStore) -> bool:
    return store.has_group(f"partials/{PASS_ONE_EXACT}")
