"""Typed access to a store's Zarr nodes: zarr 3 types `group[name]` as `Array | Group`, and an array's
`[...]` as any array-like or scalar; these name what the store layout promises and fail clearly otherwise."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from engine.errors import TributaryError
from engine.store.location import redact


def _damaged(group: zarr.Group, name: str, expected: str) -> TributaryError:
    return TributaryError(
        f"{name} in {redact(str(group.store_path))} is not a Zarr {expected}; the store is damaged: remove it and "
        "run `tributary index` again"
    )


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` under `group`."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise _damaged(group, name, "array")
    return node


def subgroup(group: zarr.Group, name: str) -> zarr.Group:
    """The group `name` under `group`."""
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise _damaged(group, name, "group")
    return node


def read(group: zarr.Group, name: str, selection: Any = ...) -> np.ndarray:
    """`selection` of the array `name` under `group`, as a NumPy array."""
    return np.asarray(array(group, name)[selection])
