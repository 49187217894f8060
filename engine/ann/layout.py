"""Where an index lives, what it records, and how its files are written so nothing half-done is ever read.

Layout of STORE.ann/ (a directory beside the store):
  index.json               the finished index: the store's identity, the settings, the index files; written
                           last, by rename, so it is the one commit point of a build
  <metric>-<build>.faiss   one FAISS index per metric ("dot": raw rows, "cos": unit-normalised rows)
  rows-<build>.npy         the rows, uncompressed and row-addressable, for the exact rerank (a store's
                           chunks hold thousands of rows: reading one candidate from the store decodes
                           its whole chunk); absent with --no-row-copy
  build/                   a build under way: plan.json (identity and settings), <metric>.trained.faiss,
                           codes/<start>.npz (each batch of rows encoded, with the row numbers), rows.npy; removed once
                           index.json is written
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Literal, TypeVar

import xxhash
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import TributaryError
from engine.store.identity import StoreIdentity
from engine.store.location import local_path, redact

Metric = Literal["dot", "cos"]
METRICS: tuple[Metric, ...] = ("dot", "cos")
INDEX_FORMAT = "tributary-ann/1"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IndexSettings(_Record):
    """How the index is built. IVF (an inverted file of `lists` k-means cells, `probes` of them searched per
    query) with an 8-bit scalar-quantised codec by default: a quarter of float32's bytes, trained in seconds."""

    metrics: tuple[Metric, ...] = METRICS
    codec: str = "SQ8"  # any FAISS IVF codec: SQ8, SQ4, Flat, PQ<m> (m dividing the width)
    lists: int  # IVF cells
    probes: int  # cells searched per query (the default; faiss nprobe)
    train_rows: int  # rows sampled to train the cells and the codec
    batch_rows: int  # rows encoded and committed per step of the build (a whole number of store chunks)
    row_copy: bool = True  # keep an uncompressed, row-addressable copy of the rows for the exact rerank


BATCH_BYTES = 32 << 20  # float32 rows per build step: a resumed build redoes at most this much


def default_lists(rows: int) -> int:
    """√N cells, each with at least the 39 training rows FAISS asks for."""
    return max(1, min(round(math.sqrt(rows)), rows // 39))


def default_probes(lists: int) -> int:
    """A quarter of the cells: recall@10 ≥ 0.95 after rerank on low-rank rows (benchmarks/ann.py)."""
    return max(1, math.ceil(lists / 4))


def default_batch_rows(width: int, rows_per_chunk: int) -> int:
    return rows_per_chunk * max(1, BATCH_BYTES // max(1, width * 4 * rows_per_chunk))


class BuildPlan(_Record):
    """What a build is for: a resumed build must match it exactly, a finished index is checked against it."""

    format: str = INDEX_FORMAT
    store_id: str | None
    completion: str
    rows: int
    width: int
    settings: IndexSettings

    @property
    def identity(self) -> StoreIdentity:
        return StoreIdentity(self.store_id, self.completion)

    @property
    def build_id(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


class IndexRecord(_Record):
    """index.json: a finished index."""

    plan: BuildPlan
    files: dict[Metric, str]  # metric -> file name in the index directory
    rows: str | None = None  # the row copy (.npy, the store's rows as float32, float64 for a float64 store)
    indexed_rows: int  # rows in the index (the store's rows less those the store skipped)
    faiss_version: str
    seconds: dict[str, float]  # train, encode, assemble
    # xxh3-128 of each file above, taken as the build committed it, checked before a file is read and by
    # `tributary info --verify`; {} in an index built before (read unchecked)
    digests: dict[str, str] = {}

    def file_names(self) -> list[str]:
        return [*self.files.values(), *([self.rows] if self.rows is not None else [])]


def index_location(store_path: str) -> Path:
    """STORE.ann beside a local store; an object-store URL is refused (FAISS reads and writes local files)."""
    path = local_path(store_path)
    if path is None:
        raise TributaryError(
            f"store {redact(store_path)} is not on a local file system; the ANN index is kept beside the store as "
            "local files: copy the store to a local path to build and use one"
        )
    return Path(path.rstrip("/") + ".ann")


def file_digest(path: Path, block: int = 16 << 20) -> str:
    """xxh3-128 of a file, read in blocks (a row copy is as large as the store's rows)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while data := handle.read(block):
            digest.update(data)
    return digest.hexdigest()


def damaged_files(root: Path, record: IndexRecord, names: list[str] | None = None) -> list[str]:
    """Each of the index's files (or of `names`) missing or not matching the digest recorded at build time."""
    problems = []
    for name in record.file_names() if names is None else names:
        expected = record.digests.get(name)
        if expected is None:
            continue
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing (deleted after the index was built)")
        elif file_digest(path) != expected:
            problems.append(f"{path}: checksum mismatch (changed after the index was built)")
    return problems


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write to NAME.part and rename: a crash leaves the old file or none, never half of the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # a full disk: no half-written part left taking the space
        part.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    part.replace(path)


def write_json(path: Path, record: BaseModel) -> None:
    write_atomically(path, record.model_dump_json(indent=2).encode())


R = TypeVar("R", bound=_Record)


def read_record(path: Path, kind: type[R], what: str, fix: str) -> R | None:
    """The record at `path`, or None if there is none; a TributaryError naming `fix` if it cannot be read."""
    try:
        return kind.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as error:
        problem = type(error).__name__
        raise TributaryError(f"{what} {path} cannot be read ({problem}); {fix}") from None


def faiss_module():
    """FAISS, or a TributaryError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise TributaryError(
            "the ANN index needs FAISS, which is not installed: pip install 'tributary[ann]' (faiss-cpu), or "
            "faiss-gpu on a CUDA machine"
        ) from None
    return faiss


def use_gpus(faiss) -> bool:
    """Whether this FAISS build has GPUs to use (faiss-cpu never has; faiss-gpu where CUDA devices are)."""
    counter = getattr(faiss, "get_num_gpus", None)
    return counter is not None and hasattr(faiss, "index_cpu_to_all_gpus") and counter() > 0
