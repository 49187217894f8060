"""A Zarr v3 group holding one index.

Layout:
  grads            (N, D) projected training gradients, row-chunked, uncompressed; bf16 kept as uint16
  fisher_grads     (N, D) like grads, of sampled labels (true Fisher): written by pass 1 for Λ, deleted once the
                   factors are final unless store.keep_fisher_grads
  rows/id          (N,) string ids, rows/num_tokens (N,) int32, rows/loss (N,) float32
  factors/<module> lam, q_a, q_s, alpha, sigma (float64) and the covariance sums they came from
  attrs["manifest"] fingerprints, projection spec, settings, per-shard completion, `complete`
                   (engine.store.manifest.StoreManifest)

A shard is a whole number of row-chunks, so a writer never shares a chunk with another writer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.common import AccessModeLiteral

from engine.config import JobConfig
from engine.config.capabilities import StoreKind
from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.projection import ModuleProjection
from engine.store.chunks import CHECKSUM_CODEC, WRITE_EVERY_CHUNK, read_checked, writable
from engine.store.encoding import PHYSICAL, decode, encode
from engine.store.integrity import (
    FACTOR_FIELDS,
    PROJECTION_ARRAYS,
    SHARD_ARRAYS,
    checksum,
    combined_checksum,
    digest_of,
    module_checksums,
    module_size,
    row_checksums,
)
from engine.store.location import exists as location_exists
from engine.store.location import redact
from engine.store.manifest import (
    STORE_FORMAT,
    ManifestStore,
    StoreManifest,
    open_group,
    parse_manifest,
    raw_manifest,
)
from engine.store.nodes import array, read, subgroup
from engine.training_run.plan import RunPlan

TARGET_CHUNK_BYTES = 16 << 20
PARTIALS_SHARE = 4  # a shard's partial sums at most a quarter of its rows' bytes, where MAX_CHUNK_BYTES allows
MAX_CHUNK_BYTES = 512 << 20
# Gradient rows are stored uncompressed: Zarr's default zstd saves about 7% of their size (projected or full
# gradients are mantissa noise to a compressor) and writes them at ~0.3 GB/s against ~3 GB/s, reads at ~0.4
# against ~0.9 GB/s on one core; at projection dim 0 that was most of the index's time.
# Each chunk ends in its xxh3 digest (8 bytes, checked on every read: engine.store.chunks).
ROW_COMPRESSORS = (CHECKSUM_CODEC,)
COMPRESSED = (ZstdCodec(level=0), CHECKSUM_CODEC)  # Zarr's default compressor, then the digest
FISHER_ROWS = "fisher_grads"


def default_rows_per_chunk(width: int, dtype: str, rows: int, batch_size: int = 1, partial_width: int = 0) -> int:
    """Rows per chunk (and so per shard) when store.rows_per_chunk is not set: ~16 MiB, but at least one batch,
    and, where every shard also writes partial sums of `partial_width` float64 values (covariances and Λ), enough
    whole batches that those are at most 1/PARTIALS_SHARE of the shard's rows, up to MAX_CHUNK_BYTES.

    A shard is the unit a worker computes, so rows wider than 16 MiB / batch_size (projection dim 0 on a model
    of a few million tracked parameters or more) would otherwise be computed in batches smaller than
    data.batch_size. And at projection dim 0 a module's covariance sums hold (k_in² + k_out²) float64 values
    against its k_in·k_out in a row: 4 to 9 rows' bytes for the shapes of a transformer block, so shards of one
    batch wrote as many bytes of partial sums as of rows (issue 13's workload: 6 GB of each). Shards of 40 rows
    there cut the index + query from 182 s to 145 s (benchmarks/results/index_throughput_exact.json). The cost
    is memory: a worker holds its shard's rows (peak 2.2 GB there against 1.5 GB with shards of 8 rows)."""
    row_bytes = max(1, width * np.dtype(PHYSICAL[dtype]).itemsize)
    wanted = max(TARGET_CHUNK_BYTES // row_bytes, batch_size)
    if partial_width:
        batch = max(1, batch_size)
        by_partials = -(-PARTIALS_SHARE * partial_width * 8 // row_bytes)
        by_partials = -(-by_partials // batch) * batch
        wanted = max(wanted, min(by_partials, max(batch, MAX_CHUNK_BYTES // row_bytes)))
    return int(max(1, min(rows, wanted)))


class GradientStore(ManifestStore[StoreManifest]):
    # ---- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, manifest: StoreManifest) -> GradientStore:
        """An empty store laid out for `manifest`'s rows, width, dtype and chunking."""
        rows, width, dtype, rows_per_chunk = manifest.rows, manifest.width, manifest.dtype, manifest.rows_per_chunk
        group = cls._create_group(path, manifest)
        group.create_array(
            "grads",
            shape=(rows, width),
            chunks=(rows_per_chunk, width),
            dtype=PHYSICAL[dtype],
            fill_value=0,
            compressors=ROW_COMPRESSORS,
            config=WRITE_EVERY_CHUNK,
        )
        group["grads"].attrs["logical_dtype"] = dtype
        meta = group.create_group("rows")
        metadata = {"chunks": (rows_per_chunk,), "compressors": COMPRESSED, "config": WRITE_EVERY_CHUNK}
        meta.create_array("id", shape=(rows,), dtype=str, **metadata)
        meta.create_array("num_tokens", shape=(rows,), dtype="int32", fill_value=0, **metadata)
        meta.create_array("loss", shape=(rows,), dtype="float32", fill_value=0, **metadata)
        group.create_group("factors")
        return cls(group, path, manifest)

    @classmethod
    def open(cls, path: str, mode: AccessModeLiteral = "r") -> GradientStore:
        group = open_group(path, mode)
        if group is None:
            if location_exists(path):
                raise TributaryError(
                    f"{redact(path)} exists but is not a Tributary store (no Zarr group); check the store path"
                )
            raise TributaryError(f"store {redact(path)} does not exist; run `tributary index` first")
        raw = raw_manifest(group)
        if raw is None or raw.get("format") != STORE_FORMAT:
            raise TributaryError(f"{redact(path)} is not a Tributary store (no {STORE_FORMAT} manifest)")
        return cls(group, path, parse_manifest(raw, StoreManifest, path))

    @staticmethod
    def exists(path: str) -> bool:
        return open_group(path) is not None

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def kind(self) -> StoreKind:
        return "checkpoint"

    # ---- as a training run of one checkpoint (the interface it shares with RunStore) -----------------------
    def run_plan(self, config: JobConfig) -> RunPlan:
        """One checkpoint, config's model, in one segment over data.train (its schedule, if any, is the method
        section's)."""
        return dataclasses.replace(RunPlan.single(path=config.model.path), datasets=(config.data.train,))

    def final_config(self, config: JobConfig) -> JobConfig:
        return config

    def final_store(self) -> GradientStore:
        return self

    def checkpoint_store(self, name: str, mode: AccessModeLiteral = "r") -> GradientStore:
        """Its one checkpoint: itself."""
        return self

    def check_schedule(self, method: str) -> None:
        """Nothing to check: a single checkpoint's schedule is the method section's (checked when parsed)."""

    def read_segment_factors(self, index: int) -> dict[str, ModuleFactors]:
        raise ValueError("a single-checkpoint store has no segment factors: its one segment's are its own")

    def read_segment_preconditioner(self, index: int) -> dict[str, np.ndarray]:
        raise ValueError("a single-checkpoint store has no optimizer preconditioners")

    def size_text(self) -> str:
        return f"{self.rows} rows"

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def rows_per_chunk(self) -> int:
        return self.manifest.rows_per_chunk

    @property
    def modules(self) -> tuple[ModuleProjection, ...]:
        return self.manifest.projection.modules

    def shards(self) -> list[tuple[int, int]]:
        step = self.rows_per_chunk
        return [(start, min(start + step, self.rows)) for start in range(0, self.rows, step)]

    # ---- rows -----------------------------------------------------------------------------------
    def write_rows(
        self, start: int, grads: np.ndarray, ids: list[str], num_tokens: np.ndarray, losses: np.ndarray
    ) -> tuple[str, dict[str, str]]:
        """Write a shard's rows; returns the checksum of exactly what was stored, and one per array."""
        stop = start + len(grads)
        stored = encode(grads, self.manifest.dtype)
        _require_finite_rows(decode(stored, self.manifest.dtype), grads, ids, start, self.manifest)
        arrays = {
            "grads": stored,
            "rows/id": np.asarray(ids, dtype=str),
            "rows/num_tokens": np.asarray(num_tokens, dtype=np.int32),
            "rows/loss": np.asarray(losses, dtype=np.float32),
        }
        for name, values in arrays.items():
            writable(self.group, name)[start:stop] = values
        digests = row_checksums(arrays)
        return combined_checksum(digests), digests

    # ---- sampled-label rows (true Fisher), read once for Λ -------------------------------------------
    def create_fisher_rows(self) -> None:
        """`fisher_grads`: the sampled-label rows pass 1 computes for the covariance, laid out as `grads`."""
        if FISHER_ROWS not in self.group:
            grads = array(self.group, "grads")
            self.group.create_array(
                FISHER_ROWS,
                shape=grads.shape,
                chunks=grads.chunks,
                dtype=grads.dtype,
                fill_value=0,
                compressors=ROW_COMPRESSORS,
                config=WRITE_EVERY_CHUNK,
            )

    def has_fisher_rows(self) -> bool:
        return FISHER_ROWS in self.group

    def write_fisher_rows(self, start: int, grads: np.ndarray) -> None:
        writable(self.group, FISHER_ROWS)[start : start + len(grads)] = encode(grads, self.manifest.dtype)

    def read_fisher_rows(self, start: int, stop: int) -> np.ndarray:
        # an older store's sampled-label rows have no digest to vouch for a chunk it skipped: read as before
        rows = self._checked(FISHER_ROWS, slice(start, stop), lambda _: True)
        return decode(rows, self.manifest.dtype)

    def delete_fisher_rows(self) -> None:
        if FISHER_ROWS in self.group:
            del self.group[FISHER_ROWS]

    def shard_checksum(self, shard: int) -> str:
        """Re-read one shard's rows and checksum them as the store's version did when it wrote them: one digest
        over the four arrays before per-array digests, the digest of the per-array digests since (raises if a
        chunk cannot be decoded)."""
        start, stop = self.shards()[shard]
        arrays = {name: read(self.group, name, slice(start, stop)) for name in SHARD_ARRAYS}
        commit = self.manifest.shards.get("gradients", {}).get(shard)
        if commit is not None and not commit.arrays:
            return checksum(arrays)
        return combined_checksum(row_checksums(arrays))

    def _checked(self, name: str, rows: slice | np.ndarray, absent_allowed=None) -> np.ndarray:
        """Rows of the array `name` as written, or a TributaryError naming the missing or damaged chunk."""
        vouched = self._written_as_fill(name) if absent_allowed is None else absent_allowed
        return read_checked(self.path, name, array(self.group, name), rows, vouched)

    def _written_as_fill(self, name: str):
        """For a store older than per-chunk digests, whose writer skipped chunks of fill values: a missing chunk
        of a row array is what was written when its shard's recorded digest matches fill values."""

        def vouched(coords: tuple[int, ...]) -> bool:
            commit = self.manifest.shards.get("gradients", {}).get(coords[0])
            if commit is None:
                return False
            if commit.arrays:
                start, stop = self.shards()[coords[0]]
                return digest_of(read(self.group, name, slice(start, stop))) == commit.arrays.get(name)
            return self.shard_checksum(coords[0]) == commit.checksum

        return vouched

    def chunk_key(self, shard: int) -> str:
        start, stop = self.shards()[shard]
        return f"grads/c/{shard}/0 (rows {start}..{stop - 1})"

    # ---- per-shard partial sums -------------------------------------------------------------------
    def create_partials(self, name: str, width: int, counts: int) -> None:
        """One row per shard (one chunk each), so every shard's writer owns its chunk."""
        shards = len(self.shards())
        root = self.group.require_group("partials")
        if name in root:
            self.check_partials_layout(name, width, counts)
        else:
            # float64 sums barely compress, and a fitted projection's full-width sums are ~100 MB a shard
            root.create_array(
                name,
                shape=(shards, width),
                chunks=(1, width),
                dtype="float64",
                fill_value=0,
                compressors=ROW_COMPRESSORS,
                config=WRITE_EVERY_CHUNK,
            )
            root.create_array(
                f"{name}_counts",
                shape=(shards, counts),
                chunks=(1, counts),
                dtype="int64",
                fill_value=0,
                compressors=COMPRESSED,
                config=WRITE_EVERY_CHUNK,
            )

    def check_partials_layout(self, name: str, width: int, counts: int) -> None:
        """Partial sums begun by an earlier version with another layout (pass 1's per-module token counts widened
        the covariance counts) cannot be added to: refused before anything is written, the store left as it is."""
        root = self.group.get("partials")
        if not isinstance(root, zarr.Group) or name not in root:
            return
        found = (array(root, name).shape[1], array(root, f"{name}_counts").shape[1])
        if found != (width, counts):
            raise TributaryError(
                f"store {redact(self.path)} was begun by an earlier version of Tributary whose partial sums "
                f"{name} have another layout ({found[0]} values and {found[1]} counts per shard, this version "
                f"writes {width} and {counts}), so it cannot be resumed; start over with `tributary index "
                "--overwrite` (or delete the partial store)"
            )

    def write_partial(self, name: str, shard: int, vector: np.ndarray, counts: np.ndarray) -> None:
        writable(self.group, f"partials/{name}")[shard] = vector
        writable(self.group, f"partials/{name}_counts")[shard] = counts

    def _partial(self, name: str, rows: slice) -> np.ndarray:
        # an older store's partial sums carry no digest: a chunk it skipped reads as before
        return read_checked(self.path, name, array(self.group, name), rows, lambda _: True, unit="shards")

    def read_partials(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self._partial(f"partials/{name}", slice(None)), self._partial(f"partials/{name}_counts", slice(None))

    def summed_partials(self, name: str, shards: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The shards' partial sums added in shard order (a fixed order, so the result does not depend on the
        workers), one shard's row read at a time: at projection dim 0 a row of covariance sums is ~100 MB, and
        reading every shard's at once held gigabytes. `shards`: only those (a fit's, which skips shards without
        fit rows, so their chunks were never written)."""
        sums = array(self.group, f"partials/{name}")
        total = np.zeros(sums.shape[1])
        chosen = range(sums.shape[0]) if shards is None else sorted(shards)
        counts = np.zeros(array(self.group, f"partials/{name}_counts").shape[1], dtype=np.int64)
        for shard in chosen:
            total += self._partial(f"partials/{name}", slice(shard, shard + 1))[0]
            counts += self._partial(f"partials/{name}_counts", slice(shard, shard + 1))[0]
        return total, counts

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return decode(self._checked("grads", slice(start, stop)), self.manifest.dtype)

    def read_row_selection(self, indices) -> np.ndarray:
        """Rows at arbitrary indices, in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        return decode(self._checked("grads", indices), self.manifest.dtype)

    def iter_chunks(self, shards: list[tuple[int, int]] | None = None):
        """(start, stop, rows) per chunk; the next chunk is read in a background thread while the caller
        works on this one (decompression and BLAS both release the GIL)."""
        shards = self.shards() if shards is None else shards
        if not shards:
            return
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self.read_rows, *shards[0])
            for index, (start, stop) in enumerate(shards):
                rows = pending.result()
                if index + 1 < len(shards):
                    pending = reader.submit(self.read_rows, *shards[index + 1])
                yield start, stop, rows

    def ids(self) -> list[str]:
        return [str(x) for x in self._checked("rows/id", slice(None))]

    def row_metadata(self) -> dict[str, np.ndarray]:
        return {
            "num_tokens": self._checked("rows/num_tokens", slice(None)),
            "loss": self._checked("rows/loss", slice(None)),
        }

    # ---- factors ----------------------------------------------------------------------------------
    def write_factors(self, factors: dict[str, ModuleFactors], name: str = "factors") -> None:
        """One float64 array per field with every module's values concatenated in layout order (a few
        arrays, not five per module: an LLM has hundreds of modules and each array costs a metadata write).
        `name` is the group: "factors" (this checkpoint's own), or e.g. "segment_basis" for a training run."""
        digests = write_factor_group(self.group.require_group(name), factors, self.modules)
        self.record_checksums(name, {f"{name}/{field}": values for field, values in digests.items()})

    def read_factors(self, name: str = "factors") -> dict[str, ModuleFactors]:
        """The factors as written: each module's values checked against the sha256 recorded when they were
        (a store older than those digests reads unchecked)."""
        factors = read_factor_group(subgroup(self.group, name), self.modules)
        check_factors(factors, self.modules, self.manifest.array_checksums, name, self.path)
        return factors

    def has_group(self, name: str) -> bool:
        return name in self.group

    def write_module_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Per-module (k_out, k_in) float64 arrays (e.g. Adam's preconditioner), packed in layout order."""
        self.record_checksums(name, {name: write_module_arrays(self.group, name, arrays, self.modules)})

    def read_module_arrays(self, name: str) -> dict[str, np.ndarray]:
        arrays = read_module_arrays(self.group, name, self.modules)
        check_module_arrays(arrays, self.manifest.array_checksums.get(name, {}), name, self.path)
        return arrays

    # ---- fitted projections -----------------------------------------------------------------------
    def has_projection(self) -> bool:
        return all(name in self.group for name in PROJECTION_ARRAYS)

    def write_projection(self, matrices: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """The fitted kinds' P_in and P_out of every module, packed in layout order, with their checksums."""
        for side, name in enumerate(PROJECTION_ARRAYS):
            pieces = {m.name: np.asarray(matrices[m.name][side], dtype=np.float64) for m in self.modules}
            packed = np.concatenate([pieces[m.name].ravel() for m in self.modules])
            _create_packed(self.group, name, packed)
            self.record_checksums(name, {name: module_checksums(pieces)})

    def read_projection(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The fitted projection, refused (naming the module) unless it matches the checksums recorded when
        it was written: rows and queries must be projected with the very matrices the index used."""
        if not self.has_projection():
            raise TributaryError(
                f"store {redact(self.path)} has no fitted projection (projection.kind "
                f"{self.manifest.projection.kind}): its index stopped before the fit; run `tributary index` again"
            )
        sides = []
        for name in PROJECTION_ARRAYS:
            packed, offset, pieces = read_packed(self.group, name), 0, {}
            for m in self.modules:
                size = module_size(name, m)
                shape = (m.d_in, m.k_in) if name == "projection_in" else (m.d_out, m.k_out)
                pieces[m.name] = packed[offset : offset + size].reshape(shape)
                offset += size
            expected = self.manifest.array_checksums.get(name, {})
            changed = [n for n, digest in module_checksums(pieces).items() if expected.get(n) != digest]
            if changed:
                raise TributaryError(
                    f"store {redact(self.path)}: the fitted projection {name} of {', '.join(changed[:3])} does not "
                    "match its checksum (changed after it was written); re-index with `tributary index --overwrite`"
                )
            sides.append(pieces)
        return {m.name: (sides[0][m.name], sides[1][m.name]) for m in self.modules}


def _require_finite_rows(stored: np.ndarray, computed: np.ndarray, ids: list[str], start: int, manifest) -> None:
    """The last guard before rows reach the store: finite as computed, but not in the store's dtype (a float16
    store overflows at 65504) is refused, naming the rows and modules."""
    from engine.gradients.finite import describe_rows, nonfinite_gradients

    found = nonfinite_gradients(stored, np.zeros(len(stored)), manifest.projection)
    if not found:
        return
    if not np.isfinite(computed).all():
        raise TributaryError(f"non-finite rows reached the store at {describe_rows(found, ids, start)}")
    raise TributaryError(
        f"store.dtype {manifest.dtype} cannot hold the gradients at {describe_rows(found, ids, start)} (they "
        "overflow it); use store.dtype: float32"
    )


def write_factor_group(
    root: zarr.Group, factors: dict[str, ModuleFactors], modules: Sequence[ModuleProjection]
) -> dict[str, dict[str, str]]:
    """Write the packed factor arrays; returns, per field written, each module's checksum."""
    digests = {}
    strategies = {module.strategy for module in factors.values()}
    root.attrs["strategy"] = strategies.pop()
    for field in FACTOR_FIELDS:
        pieces = [getattr(factors[m.name], field) for m in modules]
        if any(piece is None for piece in pieces):
            if field in root:
                del root[field]
            continue
        packed = np.concatenate([np.asarray(piece, dtype=np.float64).ravel() for piece in pieces])
        _create_packed(root, field, packed)
        digests[field] = module_checksums({m.name: piece for m, piece in zip(modules, pieces, strict=True)})
    return digests


def _refuse_changed(path: str, name: str, changed: list[str]) -> None:
    if changed:
        raise TributaryError(
            f"store {redact(path)}: {name} of {', '.join(changed[:3])} does not match its checksum (changed after "
            f"it was written), so nothing is scored with it; run `tributary info --verify {redact(path)}` to list "
            "what else changed, then re-index with `tributary index --overwrite`"
        )


def check_factors(
    factors: dict[str, ModuleFactors],
    modules: Sequence[ModuleProjection],
    recorded: dict[str, dict[str, str]],
    name: str,
    path: str,
) -> None:
    """Refuse factors read from group `name` whose values differ from the per-module sha256 recorded when they
    were written (chunk digests catch damaged bytes; these catch values rewritten with fresh chunk digests)."""
    for field in FACTOR_FIELDS:
        expected = recorded.get(f"{name}/{field}", {})
        pieces = {m.name: getattr(factors[m.name], field) for m in modules if m.name in expected}
        found = module_checksums({n: piece for n, piece in pieces.items() if piece is not None})
        _refuse_changed(path, f"{name}/{field}", [n for n in pieces if found.get(n) != expected[n]])


def check_module_arrays(arrays: dict[str, np.ndarray], expected: dict[str, str], name: str, path: str) -> None:
    """Refuse per-module arrays (a preconditioner) that differ from the sha256 recorded when they were written."""
    found = module_checksums({n: arrays[n] for n in expected if n in arrays})
    _refuse_changed(path, name, [n for n in expected if found.get(n) != expected[n]])


def read_factor_group(root: zarr.Group, modules: Sequence[ModuleProjection]) -> dict[str, ModuleFactors]:
    packed = {field: read_packed(root, field) for field in FACTOR_FIELDS if field in root}
    offsets = dict.fromkeys(packed, 0)
    out = {}
    for module in modules:
        k_in, k_out = module.k_in, module.k_out
        shapes = {"lam": (k_out, k_in), "q_a": (k_in, k_in), "q_s": (k_out, k_out), "alpha": (k_in,), "sigma": (k_out,)}
        fields = {}
        for field, values in packed.items():
            size = int(np.prod(shapes[field]))
            fields[field] = values[offsets[field] : offsets[field] + size].reshape(shapes[field])
            offsets[field] += size
        out[module.name] = ModuleFactors(strategy=str(root.attrs["strategy"]), **fields)
    return out


def write_module_arrays(
    group: zarr.Group, name: str, arrays: dict[str, np.ndarray], modules: Sequence[ModuleProjection]
) -> dict[str, str]:
    """Write the packed array; returns each module's checksum."""
    packed = np.concatenate([np.asarray(arrays[m.name], dtype=np.float64).ravel() for m in modules])
    _create_packed(group, name, packed)
    return module_checksums({m.name: arrays[m.name] for m in modules})


def read_module_arrays(group: zarr.Group, name: str, modules: Sequence[ModuleProjection]) -> dict[str, np.ndarray]:
    packed = read_packed(group, name)
    out, offset = {}, 0
    for m in modules:
        size = m.k_in * m.k_out
        out[m.name] = packed[offset : offset + size].reshape(m.k_out, m.k_in)
        offset += size
    return out


def _create_packed(group: zarr.Group, name: str, packed: np.ndarray) -> None:
    created = group.create_array(
        name, shape=packed.shape, dtype="float64", overwrite=True, compressors=COMPRESSED, config=WRITE_EVERY_CHUNK
    )
    created[...] = packed


def read_packed(group: zarr.Group, name: str) -> np.ndarray:
    """A packed per-module array as written (an older store's, without chunk digests, as Zarr reads it: the digests
    in the manifest are what check it)."""
    where, node = str(group.store_path.store), f"{group.path}/{name}".lstrip("/")
    return read_checked(where, node, array(group, name), slice(None), lambda _: True, unit="values")
