"""Whether an existing store was built from the same model, tokenizer, data and projection, with the same
settings: only then may an index run resume it."""

from __future__ import annotations

from engine.store.location import redact
from engine.store.manifest import Fingerprints, Manifest, RunManifest, StoreManifest

CHECKED = ("model", "tokenizer", "dataset", "projection")
WHAT = {
    "model": "model weights or config (model.path / model.adapter / model.modules)",
    "tokenizer": "tokenizer",
    "dataset": "training data (data.train)",
    "projection": "projection (projection.dim / seed / kind)",
}
STORE_SETTINGS = ("curvature", "data", "dtype", "rows_per_chunk", "rows")
RUN_SETTINGS = ("plan", "projection", "curvature", "store")


def mismatches(stored: Fingerprints, current: Fingerprints, keys: tuple[str, ...] = CHECKED) -> list[str]:
    """Human-readable names of the fingerprints that differ."""
    return [WHAT[key] for key in keys if getattr(stored, key) != getattr(current, key)]


def resume_refusal(existing: Manifest, wanted: Manifest, path: str) -> str | None:
    """Why the store at `path` (manifest `existing`, of the same kind) cannot be resumed to build `wanted`;
    None if it can."""
    if isinstance(existing, StoreManifest) and isinstance(wanted, StoreManifest):
        return _store_refusal(existing, wanted, path)
    if isinstance(existing, RunManifest) and isinstance(wanted, RunManifest):
        return _run_refusal(existing, wanted, path)
    raise TypeError(f"a {existing.KIND} cannot be resumed as a {wanted.KIND}")


def _store_refusal(existing: StoreManifest, wanted: StoreManifest, path: str) -> str | None:
    different = mismatches(existing.fingerprints, wanted.fingerprints)
    if different:
        return (
            f"store {redact(path)} was built from a different "
            + ", ".join(different)
            + "; choose another store.path or pass --overwrite to replace it"
        )
    changed = [key for key in STORE_SETTINGS if getattr(existing, key) != getattr(wanted, key)]
    if changed:
        return (
            f"store {redact(path)} was built with other settings ("
            + "; ".join(f"{key}: store {getattr(existing, key)} vs now {getattr(wanted, key)}" for key in changed)
            + "); choose another store.path or pass --overwrite to rebuild it"
        )
    return None


def _run_refusal(existing: RunManifest, wanted: RunManifest, path: str) -> str | None:
    different = [key for key in RUN_SETTINGS if getattr(existing, key) != getattr(wanted, key)]
    if different:
        return (
            f"store {redact(path)} was built for another training run or settings "
            f"({', '.join(different)} differ); choose another store.path or pass --overwrite to rebuild it"
        )
    return None
