"""Checksums of what each shard wrote, and `info --verify`, which re-reads and compares them."""

from __future__ import annotations

import hashlib

import numpy as np

SHARD_ARRAYS = ("grads", "rows/id", "rows/num_tokens", "rows/loss")


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the stored (encoded) values of a shard's rows, array by array in a fixed order."""
    digest = hashlib.sha256()
    for name in SHARD_ARRAYS:
        values = arrays[name]
        digest.update(name.encode())
        if values.dtype.kind in "UOT":  # str, object or numpy 2 StringDType
            digest.update("\x1f".join(str(v) for v in values).encode())
        else:
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def verify(store) -> tuple[int, list[str]]:
    """(shards checked, problems): every committed shard's rows re-read and checksummed.

    A chunk whose bytes were changed either fails to decode or gives another checksum; both are named
    by chunk key and row range. Shards never committed are reported as incomplete, not as corrupt.
    """
    committed = store.manifest.shards.get("gradients", {})
    problems = []
    for shard in range(len(store.shards())):
        commit = committed.get(shard)
        expected = None if commit is None else commit.checksum
        if expected is None:
            problems.append(f"{store.chunk_key(shard)}: not written yet (incomplete store)")
            continue
        try:
            actual = store.shard_checksum(shard)
        except Exception as error:  # a corrupt chunk can fail inside any codec
            problems.append(f"{store.chunk_key(shard)}: unreadable ({type(error).__name__}: {error})")
            continue
        if actual != expected:
            problems.append(f"{store.chunk_key(shard)}: checksum mismatch (stored data changed after it was written)")
    return len(committed), problems
