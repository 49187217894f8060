"""Ground truth on disk (Zarr): retrained measurements, reused by any number of methods.

A cache directory holds arrays and, in its attributes, the key they were computed for (the task's
fingerprint and the job's settings). Opening it with the same key reuses it (no retraining); with a
different key it is refused, naming what changed, so stale ground truth is never scored against.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from engine.errors import TributaryError


def load_or_compute(
    path: str | Path | None, key: dict, compute: Callable[[], dict[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays cached at `path` for `key`, or `compute()` written there. Returns (arrays, reused)."""
    key = json.loads(json.dumps(key))  # the form it takes in the attributes
    if path is None:
        return compute(), False
    path = Path(path)
    if (path / "zarr.json").exists():
        group = zarr.open_group(str(path), mode="r")
        stored = group.attrs.get("key")
        complete = group.attrs.get("complete", False)
        if stored != key:
            cached = stored if isinstance(stored, dict) else {}
            changed = sorted(k for k in set(key) | set(cached) if cached.get(k) != key.get(k))
            raise TributaryError(
                f"ground truth cache {path} was computed for another setting ({', '.join(changed)} changed: "
                f"cached {[cached.get(k) for k in changed]}, now {[key.get(k) for k in changed]}); "
                "use another cache path, or delete this one to retrain"
            )
        if complete:
            return {name: np.asarray(array[...]) for name, array in group.arrays()}, True
    elif path.exists() and any(path.iterdir()):
        raise TributaryError(
            f"ground truth cache {path} exists and is not a Tributary cache; give an empty or new path"
        )
    arrays = compute()
    group = zarr.open_group(str(path), mode="w", attributes={"key": key, "complete": False})
    for name, values in arrays.items():
        group.create_array(name, data=np.asarray(values))
    group.attrs["complete"] = True  # written last: an interrupted write is recomputed, never half-read
    return arrays, False
