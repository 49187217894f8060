"""Sizes of stored rows, for the estimates `tributary plan` prints."""

from __future__ import annotations

import numpy as np

from engine.store.encoding import PHYSICAL


def rows_bytes(rows: int, width: int, dtype: str) -> int:
    """Bytes of `rows` stored rows of `width` values in store dtype `dtype` (before compression: none is used)."""
    return rows * width * np.dtype(PHYSICAL[dtype]).itemsize


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    if count < 1024:
        return f"{count} B"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"
