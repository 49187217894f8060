"""Rows inside one chunk of a local checksummed array are read from the chunk's file directly (one pass fewer
than Zarr's read-then-copy); the result must equal Zarr's own read, and every such read is still checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.store.chunk_checksum import ChunkChecksumError
from engine.store.chunks import CHECKSUM_CODEC, WRITE_EVERY_CHUNK
from engine.store.whole_chunk import read_within_chunk


@pytest.fixture
def rows(tmp_path: Path) -> zarr.Array:
    """10 rows of 3 in chunks of 4: the last chunk holds 2 rows (stored padded to 4)."""
    values = np.arange(30, dtype=np.float32).reshape(10, 3) - 7.5
    array = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=values.shape,
        chunks=(4, 3),
        dtype="float32",
        fill_value=0,
        compressors=(CHECKSUM_CODEC,),
        config=WRITE_EVERY_CHUNK,
    )
    array[...] = values
    return array


@pytest.mark.parametrize("start,stop", [(0, 4), (4, 8), (8, 10), (1, 3), (9, 10)])
def test_rows_within_a_chunk_equal_zarrs_read_and_can_be_written(rows, start, stop):
    direct = read_within_chunk(rows, slice(start, stop))
    assert direct is not None
    np.testing.assert_array_equal(direct, np.arange(30, dtype=np.float32).reshape(10, 3)[start:stop] - 7.5)
    direct += 1  # callers get a writable array, as from Zarr


@pytest.mark.parametrize("selection", [slice(2, 6), slice(0, 10), slice(0, 4, 2), slice(5, 5)])
def test_rows_across_chunks_or_strided_are_left_to_zarr(rows, selection):
    assert read_within_chunk(rows, selection) is None


def test_a_flipped_byte_is_refused(rows):
    chunk = Path(rows.store.root) / "c" / "1" / "0"  # type: ignore[attr-defined]
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChunkChecksumError):
        read_within_chunk(rows, slice(4, 8))
    with pytest.raises(ChunkChecksumError):
        rows[4:8]  # and Zarr's own read of it, which a truncated chunk falls back to


def test_a_truncated_chunk_is_left_to_zarr_which_refuses_it(rows):
    chunk = Path(rows.store.root) / "c" / "0" / "0"  # type: ignore[attr-defined]
    chunk.write_bytes(chunk.read_bytes()[:-3])
    assert read_within_chunk(rows, slice(0, 4)) is None
    with pytest.raises(ChunkChecksumError):
        rows[0:4]
