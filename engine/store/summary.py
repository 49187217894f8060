"""What `tributary info` and the service's /v1/info say about a store: its manifest, summarised."""

from __future__ import annotations

from engine.store.location import redact
from engine.store.zarr_store import GradientStore

SUMMARY_KEYS = (
    "format",
    "code_version",
    "rows",
    "width",
    "dtype",
    "rows_per_chunk",
    "complete",
    "fingerprints",
    "curvature",
    "stages",
    "timings",
)


def manifest_summary(store: GradientStore) -> dict:
    manifest = store.manifest
    summary = {key: manifest.get(key) for key in SUMMARY_KEYS}
    summary["path"] = redact(store.path)
    summary["shards_completed"] = f"{len(manifest.get('completed_shards', []))} of {len(store.shards())}"
    summary["modules"] = len(manifest["projection"]["modules"])
    summary["projection"] = {key: manifest["projection"].get(key) for key in ("dim", "seed", "kind")}
    summary["nodes"] = sorted({entry["node"] for entry in manifest.get("shards", {}).get("gradients", {}).values()})
    summary["runs"] = len(manifest.get("runs", []))
    return summary
