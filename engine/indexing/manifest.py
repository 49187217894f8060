"""What a store records about how it was built."""

from __future__ import annotations

from engine import __version__
from engine.config import JobConfig
from engine.projection import ProjectionSpec
from engine.store.location import redact


def build_manifest(
    config: JobConfig,
    spec: ProjectionSpec,
    fingerprints: dict,
    dataset_fingerprint: str,
    coverage: dict | None = None,
) -> dict:
    """What a store records about how it was built (credentials never appear: paths are redacted); `coverage`:
    engine.capture.coverage's report of what the tracked modules cover."""
    settings = config.model_dump()
    settings["store"]["path"] = redact(settings["store"]["path"])
    return {
        "code_version": __version__,
        "fingerprints": dict(fingerprints, dataset=dataset_fingerprint, projection=spec.fingerprint()),
        "projection": spec.to_dict(),
        # curvature.lambdas is not compared on resume: either source gives the same Λ, and a store whose pass 1
        # ran without fisher_grads falls back to the model pass (engine.indexing.worker `_stored_rows`)
        "curvature": config.curvature.model_dump(exclude={"lambdas"}),
        # on_nonfinite is not compared on resume: what it did is in the manifest's `skipped`
        "data": config.data.model_dump(exclude={"batch_size", "train", "on_nonfinite"}),
        "model": config.model.model_dump(),
        "config": settings,
        "coverage": coverage or {},
    }
