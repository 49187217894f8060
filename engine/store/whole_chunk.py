"""Reading rows that lie inside one chunk of a local, checksummed array straight from its file.

Through Zarr a chunk is read into one buffer, checked, then copied into the output array: two passes over the
bytes besides the digest's. Read here, the file lands once in a writable buffer, is checked in place, and the
rows are a view of it, so checking a scan's chunks costs less than Zarr's copy saves. Any other layout (a
remote store, a compressor before the digest, rows across chunks) returns None and is read through Zarr.
"""

from __future__ import annotations

import os
import sys
from typing import Any, cast

import numpy as np
import xxhash
import zarr
from zarr.codecs import BytesCodec
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

from engine.store.chunk_checksum import DIGEST_BYTES, ChunkChecksumError, Xxh3Checksum


def _plain_checksummed(array: zarr.Array) -> bool:
    codecs = array.metadata.codecs if isinstance(array.metadata, ArrayV3Metadata) else ()
    return (
        len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
        and isinstance(codecs[1], Xxh3Checksum)
    )


def read_within_chunk(array: zarr.Array, rows: slice) -> np.ndarray | None:
    """`array[rows]` when the rows lie in one chunk of a local array whose only codec after the bytes is the
    digest; raises ChunkChecksumError when the chunk's bytes fail it, None when the layout is another (or the
    file's size is not a whole chunk's: Zarr then reads it and its codec refuses it)."""
    start, stop, step = rows.indices(array.shape[0])
    per_chunk = array.chunks[0]
    if step != 1 or stop <= start or start // per_chunk != (stop - 1) // per_chunk:
        return None
    if array.ndim < 1 or array.chunks[1:] != array.shape[1:] or not isinstance(array.store, LocalStore):
        return None
    if not _plain_checksummed(array):
        return None
    first = start // per_chunk
    key = array.metadata.encode_chunk_key((first,) + (0,) * (array.ndim - 1))
    path = array.store.root / array.store_path.path / key
    dtype = np.dtype(array.dtype)
    expected = int(np.prod(array.chunks)) * dtype.itemsize + DIGEST_BYTES
    data = np.empty(expected, dtype=np.uint8)
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size != expected or file.readinto(cast(Any, data)) != expected:
            return None
    body = data[:-DIGEST_BYTES]
    if xxhash.xxh3_64_digest(cast(Any, body)) != data[-DIGEST_BYTES:].tobytes():
        raise ChunkChecksumError("chunk checksum mismatch")
    offset = first * per_chunk
    return body.view(dtype).reshape(array.chunks)[start - offset : stop - offset]
