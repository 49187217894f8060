"""Checksums of what a store holds, taken as it is written, and `info --verify`, which re-reads and compares them.

Covered: every shard's row arrays (grads, rows/id, rows/num_tokens, rows/loss; one digest each, in the
shard's commit), each module's slice of every packed per-module array (factors, preconditioners; in the
manifest's `array_checksums`), and every chunk of any other array that carries per-chunk digests (the partial
sums, the sampled-label rows: engine.store.chunks). A problem names the array, the module or rows, and the chunk; a chunk whose
file is gone is "missing" (Zarr would read it as fill values, which is not what was written).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.sync import sync

from engine.projection import ModuleProjection
from engine.store.chunk_checksum import ChunkChecksumError
from engine.store.chunks import checksummed
from engine.store.manifest import ARRAY_CHECKSUMS_SINCE, Manifest, ShardCommit

SHARD_ARRAYS = ("grads", "rows/id", "rows/num_tokens", "rows/loss")
FACTOR_FIELDS = ("lam", "q_a", "q_s", "alpha", "sigma")
# Groups of packed per-module arrays that scores depend on; checked when the manifest has their digests.
MODULE_GROUPS = (
    "factors",
    "segment_basis",
    "preconditioned_factors",
    "preconditioner",
    "segment_scale",
    "projection_in",
    "projection_out",
)
PROJECTION_ARRAYS = ("projection_in", "projection_out")  # fitted projections: (d_in, k_in) and (d_out, k_out)


@dataclass
class Verification:
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # arrays present but written without checksums


def _update(digest, values: np.ndarray) -> None:
    if values.dtype.kind in "UOT":  # str, object or numpy 2 StringDType
        digest.update("\x1f".join(str(v) for v in values).encode())
    else:
        # the array's own buffer, not a tobytes() copy: at projection dim 0 a shard's rows are gigabytes
        digest.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8).data)


def digest_of(values: np.ndarray) -> str:
    digest = hashlib.sha256()
    _update(digest, values)
    return digest.hexdigest()


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the stored (encoded) values of a shard's rows, array by array in a fixed order: the shard
    checksum of stores written before per-array digests (verified against it by `info --verify`)."""
    digest = hashlib.sha256()
    for name in SHARD_ARRAYS:
        digest.update(name.encode())
        _update(digest, arrays[name])
    return digest.hexdigest()


def row_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """One sha256 per row array of a shard, so verification can name the array that changed."""
    return {name: digest_of(arrays[name]) for name in SHARD_ARRAYS}


def combined_checksum(digests: dict[str, str]) -> str:
    """A shard's checksum from its per-array digests (sha256 over name and digest, in a fixed order): it changes
    whenever any array does, and the rows are hashed once (twice, at ~1.5 GB/s, would be ~9 s of a dim-0 index
    of issue 13's 6.5 GB of rows)."""
    digest = hashlib.sha256()
    for name in SHARD_ARRAYS:
        digest.update(f"{name}\x1f{digests[name]}\x1e".encode())
    return digest.hexdigest()


def module_size(field_name: str, module: ModuleProjection) -> int:
    """Values of `module` in the packed array `field_name` (a factor field, a fitted projection, or a (k_out, k_in)
    array)."""
    sizes = {
        "q_a": module.k_in**2,
        "q_s": module.k_out**2,
        "alpha": module.k_in,
        "sigma": module.k_out,
        "projection_in": module.d_in * module.k_in,
        "projection_out": module.d_out * module.k_out,
    }
    return sizes.get(field_name, module.k_in * module.k_out)


def module_checksums(pieces: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of each module's float64 values, as they are packed."""
    return {name: digest_of(np.asarray(piece, dtype=np.float64).ravel()) for name, piece in pieces.items()}


def _array(group: zarr.Group, path: str) -> zarr.Array:
    array = group[path]
    if not isinstance(array, zarr.Array):
        raise TypeError(f"{path} is a group, not an array")
    return array


def _read(array: zarr.Array, selection: slice) -> np.ndarray:
    return np.asarray(array[selection])


def _chunk_present(array: zarr.Array, coords: tuple[int, ...]) -> bool:
    return bool(sync((array.store_path / array.metadata.encode_chunk_key(coords)).exists()))


def _chunk_name(name: str, array: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{name}/{array.metadata.encode_chunk_key(coords)}"


# ---- rows -------------------------------------------------------------------------------------------------
def _shard_coords(name: str, shard: int) -> tuple[int, ...]:
    return (shard, 0) if name == "grads" else (shard,)


def _verify_shard(group: zarr.Group, shard: int, rows: tuple[int, int], commit: ShardCommit) -> list[str]:
    start, stop = rows
    where = f"(rows {start}..{stop - 1})"
    arrays = {name: _array(group, name) for name in SHARD_ARRAYS}
    chunks = {name: _chunk_name(name, arrays[name], _shard_coords(name, shard)) for name in SHARD_ARRAYS}
    absent = [name for name in SHARD_ARRAYS if not _chunk_present(arrays[name], _shard_coords(name, shard))]
    values = {}
    for name in SHARD_ARRAYS:
        try:
            values[name] = _read(arrays[name], slice(start, stop))
        except ChunkChecksumError:
            return [f"{chunks[name]} {where}: checksum mismatch (stored data changed after it was written)"]
        except Exception as error:  # a corrupt chunk can fail inside any codec
            return [f"{chunks[name]} {where}: unreadable ({type(error).__name__}: {error})"]
    if not commit.arrays:  # written before per-array checksums: one digest over all four arrays
        if checksum(values) == commit.checksum:
            return []
        if absent:
            return [f"{chunks[name]} {where}: missing (chunk deleted after it was written)" for name in absent]
        named = ", ".join(chunks.values())
        return [
            f"rows {start}..{stop - 1}: checksum mismatch in one of {named} (stored data changed after it was written)"
        ]
    problems = []
    for name in SHARD_ARRAYS:
        if digest_of(values[name]) == commit.arrays.get(name):
            continue
        if name in absent:
            problems.append(f"{chunks[name]} {where}: missing (chunk deleted after it was written)")
        else:
            problems.append(f"{chunks[name]} {where}: checksum mismatch (stored data changed after it was written)")
    return problems


# ---- packed per-module arrays -----------------------------------------------------------------------------
def _verify_packed(
    group: zarr.Group, path: str, expected: dict[str, str], modules: Sequence[ModuleProjection]
) -> list[str]:
    prefix, _, field_name = path.rpartition("/")
    if path not in group:
        return [f"{path}: missing (array deleted after it was written)"]
    array = _array(group, path)
    try:
        packed = _read(array, slice(None))
    except ChunkChecksumError:
        return _chunk_problems(path, array)
    except Exception as error:
        return [f"{path}: unreadable ({type(error).__name__}: {error})"]
    chunk = array.chunks[0]
    problems, offset = [], 0
    for module in modules:
        size = module_size(field_name, module)
        name = f"{prefix}/{module.name}/{field_name}" if field_name in FACTOR_FIELDS else f"{path}/{module.name}"
        if module.name in expected and digest_of(packed[offset : offset + size]) != expected[module.name]:
            covering = [(index,) for index in range(offset // chunk, (offset + max(size, 1) - 1) // chunk + 1)]
            absent = [_chunk_name(path, array, c) for c in covering if not _chunk_present(array, c)]
            if absent:
                problems.append(f"{name}: missing (chunk {', '.join(absent)} deleted after it was written)")
            else:
                chunks = ", ".join(_chunk_name(path, array, c) for c in covering)
                problems.append(
                    f"{name} (chunk {chunks}): checksum mismatch (stored data changed after it was written)"
                )
        offset += size
    return problems


def _verify_module_arrays(
    group: zarr.Group, manifest: Manifest, groups: list[str], modules: Sequence[ModuleProjection]
) -> Verification:
    """Every recorded per-module array; the groups in `groups` present without any digest are unchecked."""
    found = Verification()
    recorded = manifest.array_checksums
    for path, expected in recorded.items():
        found.problems.extend(_verify_packed(group, path, expected, modules))
    older = manifest.format_version < ARRAY_CHECKSUMS_SINCE
    for name in groups:
        if name in group and not any(path == name or path.startswith(f"{name}/") for path in recorded):
            why = (
                "written before Tributary checksummed factors and preconditioners" if older else "no checksum recorded"
            )
            found.unchecked.append(f"{name}: unchecked ({why})")
    return found


# ---- arrays with a digest per chunk ----------------------------------------------------------------------
def _arrays(group: zarr.Group, prefix: str = ""):
    for name, node in group.members():
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Array):
            yield path, node
        elif isinstance(node, zarr.Group):
            yield from _arrays(node, f"{path}/")


def _chunk_problems(path: str, array: zarr.Array, complete: bool = True) -> list[str]:
    """Each chunk of `array` missing (where a complete store must have it) or failing its digest."""
    problems = []
    for coords in np.ndindex(*array.cdata_shape):
        chunk = _chunk_name(path, array, coords)
        if not _chunk_present(array, coords):
            if complete:
                problems.append(f"{chunk}: missing (chunk deleted after it was written)")
            continue
        try:
            array.get_block_selection(coords)
        except ChunkChecksumError:
            problems.append(f"{chunk}: checksum mismatch (stored data changed after it was written)")
    return problems


def _verify_chunks(group: zarr.Group, skip: set[str], complete: bool) -> list[str]:
    """Every chunk of every array written with per-chunk digests (outside `skip`). An incomplete store's
    missing chunks are work not done yet, not damage."""
    problems = []
    for path, array in _arrays(group):
        if path not in skip and checksummed(array):
            problems.extend(_chunk_problems(path, array, complete))
    return problems


# ---- stores -----------------------------------------------------------------------------------------------
def verify(store) -> Verification:
    """A gradient store: every committed shard's rows and every checksummed factor or preconditioner re-read.

    Shards never committed are reported as incomplete, not as corrupt.
    """
    committed = store.manifest.shards.get("gradients", {})
    found = _verify_module_arrays(store.group, store.manifest, list(MODULE_GROUPS), store.modules)
    problems = []
    for shard, rows in enumerate(store.shards()):
        commit = committed.get(shard)
        if commit is None or commit.checksum is None:
            problems.append(f"{store.chunk_key(shard)}: not written yet (incomplete store)")
            continue
        problems.extend(_verify_shard(store.group, shard, rows, commit))
    whole: set[str] = {*SHARD_ARRAYS, *store.manifest.array_checksums}
    found.problems = problems + found.problems + _verify_chunks(store.group, whole, store.manifest.complete)
    found.shards_checked = len(committed)
    return found


def verify_run_arrays(run) -> Verification:
    """A training-run store's own arrays: each segment's factors and preconditioner (not its checkpoints)."""
    segments = [f"segments/{name}" for name in run.group["segments"].group_keys()] if "segments" in run.group else []
    groups = [f"{segment}/{part}" for segment in sorted(segments) for part in ("factors", "preconditioner")]
    return _verify_module_arrays(run.group, run.manifest, groups, run.modules)
