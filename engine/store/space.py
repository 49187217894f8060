"""A full file system under a store being written: one line naming the store, the file being written and the
bytes still needed, never a traceback.

Nothing half-written is recorded as done: Zarr writes each chunk to a temporary file and renames it (a failed
write leaves the old chunk or none), and a shard is committed in the manifest only after all of its chunks
were written, so `tributary index` run again after space is freed redoes exactly the shards not committed.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import zarr

from engine.errors import TributaryError
from engine.store.chunks import chunk_present
from engine.store.location import redact

FULL = (errno.ENOSPC, errno.EDQUOT)
DIGEST_BYTES = 8
STRING_BYTES = 16  # an estimate per id of a rows/id chunk


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in FULL


def _arrays(group: zarr.Group):
    for _, node in group.members():
        if isinstance(node, zarr.Array):
            yield node
        elif isinstance(node, zarr.Group):
            yield from _arrays(node)


def _chunk_bytes(array: zarr.Array) -> int:
    itemsize = array.dtype.itemsize if array.dtype.kind not in "UOT" else STRING_BYTES
    return int(np.prod(array.chunks)) * max(1, itemsize) + DIGEST_BYTES


def bytes_still_needed(group: zarr.Group) -> int:
    """Bytes of the chunks the store's layout has that are not written yet (uncompressed: an upper bound where a
    chunk compresses)."""
    total = 0
    for array in _arrays(group):
        try:
            absent = sum(1 for coords in np.ndindex(*array.cdata_shape) if not chunk_present(array, coords))
        except Exception:  # an array whose metadata the full disk cut short: it is rewritten on resume
            continue
        total += absent * _chunk_bytes(array)
    return total


def store_factor_bytes(store) -> int:
    """The float64 factors of every module (Q_A, Q_S, Λ, α, σ), once the curvature is fitted."""
    return 8 * sum(m.k_in**2 + m.k_out**2 + m.k_in * m.k_out + m.k_in + m.k_out for m in store.modules)


def disk_full(store_path: str, error: OSError) -> TributaryError:
    """The one-line error for `error` (ENOSPC or EDQUOT) while the store at `store_path` was written."""
    from engine.store.zarr_store import GradientStore

    try:
        store = GradientStore.open(store_path)
        needed = bytes_still_needed(store.group)
        if not store.manifest.complete:  # the factors are written (again) at the end of the index
            needed += store_factor_bytes(store)
    except Exception:  # the estimate must not hide the error it explains
        needed = None
    writing = f" writing {error.filename}" if error.filename else ""
    estimate = (
        f"about {needed:,} bytes more are needed to finish (the chunks and factors not written yet, estimated "
        "from the store's layout): free that much space there"
        if needed
        else "free space there"
    )
    return TributaryError(
        f"store.path {redact(store_path)}: the file system is full ({os.strerror(error.errno or errno.ENOSPC)}"
        f"{writing}); {estimate}, or choose another store.path, and run `tributary index` again: it keeps the "
        "shards already written and redoes the rest"
    )


def out_of_space(subject: str, error: OSError, needed: int | None, again: str) -> TributaryError:
    """The one-line error for ENOSPC/EDQUOT while writing `subject` (an output file, an index being built):
    the file, the bytes still needed when they are known, and what to run once space is freed."""
    writing = f" writing {error.filename}" if error.filename else ""
    estimate = f"about {needed:,} bytes more are needed: free that much space there" if needed else "free space there"
    return TributaryError(
        f"{subject}: the file system is full ({os.strerror(error.errno or errno.ENOSPC)}{writing}); {estimate}, "
        f"and {again}"
    )
