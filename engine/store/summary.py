"""What `tributary info` and the service's /v1/info say about a store: its manifest, summarised, and with
`verify` the problems found re-reading every shard, factor and preconditioner."""

from __future__ import annotations

from typing import Any

from engine.store.integrity import Verification, verify_run_arrays
from engine.store.integrity import verify as verify_store
from engine.store.location import redact
from engine.store.run_store import RunStore
from engine.store.zarr_store import GradientStore


def store_summary(opened: GradientStore | RunStore, verify: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(summary, verification problems) of either kind of store; no problems without `verify`."""
    if isinstance(opened, RunStore):
        return run_summary(opened, verify)
    summary = {**manifest_summary(opened), **_exact_factors(opened)}
    problems: list[str] = []
    if verify:
        found = verify_store(opened)
        summary["verify"] = verification_summary(found)
        problems = found.problems
    return summary, problems


def _exact_factors(store: GradientStore) -> dict[str, str]:
    """The note on full-width factors, only where there are some: a store without them reads as it always did."""
    if not store.manifest.stages.get("exact_factors"):
        return {}
    return {"exact_factors": "full-width curvature factors, one group per module (tributary query --exact)"}


def verification_summary(found: Verification) -> dict[str, Any]:
    """What `verify` found; `unchecked` only where something could not be checked (an older store)."""
    summary: dict[str, Any] = {"shards_checked": found.shards_checked, "problems": found.problems}
    if found.unchecked:
        summary["unchecked"] = found.unchecked
    return summary


def manifest_summary(store: GradientStore) -> dict[str, Any]:
    manifest = store.manifest
    summary = {
        "format": manifest.format,
        "code_version": manifest.code_version,
        "rows": manifest.rows,
        "width": manifest.width,
        "dtype": manifest.dtype,
        "rows_per_chunk": manifest.rows_per_chunk,
        "complete": manifest.complete,
        "fingerprints": manifest.fingerprints.model_dump(),
        "curvature": dict(manifest.curvature),
        "stages": dict(manifest.stages),
        "timings": manifest.timings and dict(manifest.timings),
        "path": redact(store.path),
        "shards_completed": f"{len(manifest.completed_shards)} of {len(store.shards())}",
        "modules": len(manifest.projection.modules),
        "projection": {
            "dim": manifest.projection.dim,
            "seed": manifest.projection.seed,
            "kind": manifest.projection.kind,
        },
        "nodes": sorted({commit.node for commit in manifest.shards.get("gradients", {}).values()}),
        "runs": len(manifest.runs),
    }
    if manifest.coverage:  # a store written before the coverage report has none
        summary["coverage"] = dict(manifest.coverage)
    return summary


def run_summary(run: RunStore, verify: bool = False) -> tuple[dict[str, Any], list[str]]:
    """A training-run store: its plan, and each checkpoint store's completeness (and checksums with `verify`)."""
    manifest = run.manifest
    plan = manifest.plan
    summary: dict[str, Any] = {
        "format": manifest.format,
        "complete": manifest.complete,
        "curvature": dict(manifest.curvature),
        "segments_done": list(manifest.segments_done),
        "timings": manifest.timings and dict(manifest.timings),
        "plan": plan.to_dict(),
    }
    checkpoints: dict[str, Any] = {}
    problems: list[str] = []
    averaged = [segment.averaged.group_name for segment in plan.segments] if plan.averaged else []
    keys = [checkpoint.name for checkpoint in plan.checkpoints] + averaged
    for key in keys:
        if not run.has_checkpoint(key):
            checkpoints[key] = "not written yet"
            continue
        sub = run.checkpoint(key)
        checkpoints[key] = {
            "rows": sub.rows,
            "complete": sub.manifest.complete,
            "shards_completed": f"{len(sub.manifest.completed_shards)} of {len(sub.shards())}",
            **_exact_factors(sub),
        }
        if verify:
            found = verify_store(sub)
            checkpoints[key]["verify"] = verification_summary(found)
            problems.extend(f"{key}: {problem}" for problem in found.problems)
    summary["checkpoints"] = checkpoints
    if verify:
        own = verify_run_arrays(run)
        summary["verify"] = {"problems": own.problems, **({"unchecked": own.unchecked} if own.unchecked else {})}
        problems = own.problems + problems
    return summary, problems
