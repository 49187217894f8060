"""A Zarr v3 group holding one index.

Layout:
  grads            (N, D) projected training gradients, row-chunked, zstd; bf16 kept as uint16
  rows/id          (N,) string ids, rows/num_tokens (N,) int32, rows/loss (N,) float32
  factors/<module> lam, q_a, q_s, alpha, sigma (float64) and the covariance sums they came from
  attrs["manifest"] fingerprints, projection spec, settings, per-shard completion, `complete`

A shard is a whole number of row-chunks, so a writer never shares a chunk with another writer.
"""

from __future__ import annotations

import numpy as np
import zarr

from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.store.encoding import PHYSICAL, decode, encode
from engine.store.location import exists as location_exists
from engine.store.location import redact

FORMAT = "tributary-store/1"
TARGET_CHUNK_BYTES = 16 << 20
FACTOR_FIELDS = ("lam", "q_a", "q_s", "alpha", "sigma")


def default_rows_per_chunk(width: int, dtype: str, rows: int) -> int:
    itemsize = np.dtype(PHYSICAL[dtype]).itemsize
    return int(max(1, min(rows, TARGET_CHUNK_BYTES // max(1, width * itemsize))))


class GradientStore:
    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path

    # ---- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, manifest: dict, rows: int, width: int, dtype: str,
               rows_per_chunk: int) -> "GradientStore":
        manifest = dict(manifest, format=FORMAT, rows=rows, width=width, dtype=dtype,
                        rows_per_chunk=rows_per_chunk, completed_shards=[], stages={}, complete=False)
        # The manifest (complete: false) goes in with the group itself, so a run that dies while the
        # arrays are being laid out still leaves a recognisable, incomplete store rather than a bare group.
        group = zarr.open_group(path, mode="w", attributes={"manifest": manifest})
        group.create_array("grads", shape=(rows, width), chunks=(rows_per_chunk, width),
                           dtype=PHYSICAL[dtype], fill_value=0)
        group["grads"].attrs["logical_dtype"] = dtype
        meta = group.create_group("rows")
        meta.create_array("id", shape=(rows,), chunks=(rows_per_chunk,), dtype=str)
        meta.create_array("num_tokens", shape=(rows,), chunks=(rows_per_chunk,), dtype="int32", fill_value=0)
        meta.create_array("loss", shape=(rows,), chunks=(rows_per_chunk,), dtype="float32", fill_value=0)
        group.create_group("factors")
        return cls(group, path)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "GradientStore":
        try:
            group = zarr.open_group(path, mode=mode)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError):
            if location_exists(path):
                raise TributaryError(
                    f"{redact(path)} exists but is not a Tributary store (no Zarr group); check the store path"
                ) from None
            raise TributaryError(f"store {redact(path)} does not exist; run `tributary index` first") from None
        manifest = group.attrs.get("manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TributaryError(f"{redact(path)} is not a Tributary store (no {FORMAT} manifest)")
        return cls(group, path)

    @staticmethod
    def exists(path: str) -> bool:
        try:
            zarr.open_group(path, mode="r")
            return True
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError):
            return False

    # ---- manifest -------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs["manifest"])

    def update_manifest(self, **changes) -> None:
        self.group.attrs["manifest"] = dict(self.manifest, **changes)

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def rows_per_chunk(self) -> int:
        return int(self.manifest["rows_per_chunk"])

    def shards(self) -> list[tuple[int, int]]:
        step = self.rows_per_chunk
        return [(start, min(start + step, self.rows)) for start in range(0, self.rows, step)]

    # ---- rows -----------------------------------------------------------------------------------
    def write_rows(self, start: int, grads: np.ndarray, ids: list[str], num_tokens: np.ndarray,
                   losses: np.ndarray) -> None:
        stop = start + len(grads)
        self.group["grads"][start:stop] = encode(grads, self.manifest["dtype"])
        self.group["rows/id"][start:stop] = np.asarray(ids, dtype=str)
        self.group["rows/num_tokens"][start:stop] = np.asarray(num_tokens, dtype=np.int32)
        self.group["rows/loss"][start:stop] = np.asarray(losses, dtype=np.float32)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return decode(self.group["grads"][start:stop], self.manifest["dtype"])

    def iter_chunks(self):
        for start, stop in self.shards():
            yield start, stop, self.read_rows(start, stop)

    def ids(self) -> list[str]:
        return [str(x) for x in self.group["rows/id"][:]]

    def row_metadata(self) -> dict[str, np.ndarray]:
        return {"num_tokens": self.group["rows/num_tokens"][:], "loss": self.group["rows/loss"][:]}

    # ---- factors --------------------------------------------------------------------------------
    def write_factors(self, factors: dict[str, ModuleFactors]) -> None:
        root = self.group["factors"]
        for name, module in factors.items():
            node = root.require_group(name)
            node.attrs["strategy"] = module.strategy
            for field in FACTOR_FIELDS:
                value = getattr(module, field)
                if value is None:
                    continue
                array = node.create_array(field, shape=value.shape, dtype="float64", overwrite=True)
                array[...] = value

    def read_factors(self) -> dict[str, ModuleFactors]:
        out = {}
        root = self.group["factors"]
        for module in self.manifest["projection"]["modules"]:
            name = module["name"]
            node = root[name]
            fields = {field: node[field][...] for field in FACTOR_FIELDS if field in node}
            out[name] = ModuleFactors(strategy=node.attrs["strategy"], **fields)
        return out
