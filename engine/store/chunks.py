"""Reads that return only the bytes that were written, or a TributaryError naming the chunk.

Zarr reads a chunk whose file is gone as its fill value, so a deleted chunk of gradient rows was scored as
rows of zeros. Arrays written by this version carry an xxh3 digest per chunk (engine.store.chunk_checksum)
and store every chunk, even an all-zero one: for them a missing chunk is always damage, and a flipped byte
fails the digest on read. Arrays of older stores have no digest and skipped all-fill chunks; for them a
missing chunk is damage unless the caller's recorded digest says the fill values are what was written
(`absent_allowed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import product

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.sync import sync

from engine.errors import TributaryError
from engine.store.chunk_checksum import ChunkChecksumError, Xxh3Checksum
from engine.store.location import redact
from engine.store.whole_chunk import read_within_chunk

CHECKSUM_CODEC = Xxh3Checksum()
# Zarr's default (False) skips writing a chunk equal to the fill value, which would make a missing chunk
# ambiguous; the setting is not saved with the array, so every writer applies it (`writable`).
WRITE_EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}


def writable(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` under `group`, set to store every chunk it is given."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TributaryError(f"{name} in {redact(str(group.store_path))} is not a Zarr array; the store is damaged")
    return node.with_config(WRITE_EVERY_CHUNK)


def checksummed(array: zarr.Array) -> bool:
    """Written by this version: a digest per chunk and every chunk stored."""
    return any(isinstance(codec, Xxh3Checksum) for codec in array.compressors)


def chunk_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    return array.metadata.encode_chunk_key(coords)


def chunk_present(array: zarr.Array, coords: tuple[int, ...]) -> bool:
    return bool(sync((array.store_path / chunk_key(array, coords)).exists()))


def row_chunks(array: zarr.Array, rows: Iterable[int] | slice) -> list[tuple[int, ...]]:
    """The chunks holding `rows` (a slice or indices along the first axis) across the whole of the other axes."""
    step = array.chunks[0]
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(array.shape[0])
        firsts = list(range(start // step, (stop - 1) // step + 1)) if stop > start else []
    else:
        firsts = sorted({int(row) // step for row in rows})
    others = [range(-(-size // chunk)) for size, chunk in zip(array.shape[1:], array.chunks[1:], strict=True)]
    return [(first, *rest) for first in firsts for rest in product(*others)]


def _describe(name: str, array: zarr.Array, coords: tuple[int, ...], unit: str) -> str:
    first = coords[0] * array.chunks[0]
    last = min(first + array.chunks[0], array.shape[0]) - 1
    return f"{name}/{chunk_key(array, coords)} ({unit} {first}..{last})"


def damaged_chunk(store_path: str, what: str, why: str) -> TributaryError:
    return TributaryError(
        f"store {redact(store_path)}: chunk {what} {why}, so nothing is scored from it; run "
        f"`tributary info --verify {redact(store_path)}` to list every damaged chunk, then re-index "
        "(`tributary index --overwrite`) or restore the store from a copy"
    )


def read_checked(
    store_path: str,
    name: str,
    array: zarr.Array,
    rows: slice | np.ndarray,
    absent_allowed: Callable[[tuple[int, ...]], bool] = lambda _: False,
    unit: str = "rows",
) -> np.ndarray:
    """`array[rows]` (or its orthogonal selection of row indices), refused when a chunk it covers is missing
    (unless an older store's `absent_allowed` vouches for it) or fails its checksum."""
    coords = row_chunks(array, rows)
    strict = checksummed(array)
    for chunk in coords:
        if not chunk_present(array, chunk) and (strict or not absent_allowed(chunk)):
            raise damaged_chunk(
                store_path, _describe(name, array, chunk, unit), "is missing (deleted after it was written)"
            )
    try:
        if isinstance(rows, slice):
            direct = read_within_chunk(array, rows) if strict else None
            return np.asarray(array[rows]) if direct is None else direct
        return np.asarray(array.get_orthogonal_selection((rows,) + (slice(None),) * (array.ndim - 1)))
    except ChunkChecksumError:
        bad = next((chunk for chunk in coords if not _chunk_decodes(array, chunk)), coords[0])
        raise damaged_chunk(
            store_path, _describe(name, array, bad, unit), "fails its checksum (its bytes changed after it was written)"
        ) from None
    except FileNotFoundError:
        raise damaged_chunk(
            store_path, _describe(name, array, coords[0], unit), "is missing (deleted while it was read)"
        ) from None


def _chunk_decodes(array: zarr.Array, coords: tuple[int, ...]) -> bool:
    try:
        array.get_block_selection(coords)
    except ChunkChecksumError:
        return False
    return True
