"""The manifest a store keeps in its Zarr group's attributes: what it was built from, its layout, what is done.

Two kinds, one reader and one writer: a single-checkpoint gradient store (`StoreManifest`, format
tributary-store/1) and a training-run store (`RunManifest`, tributary-run/1), both opened through
`ManifestStore`. `format` names the kind (the string stores have always carried); `format_version` is the
layout's version, checked on open. A store written before the manifest had a version is version 1; a store
from a newer Tributary is refused with a message to upgrade rather than misread.

A new field needs a default (stores written without it must still read) and a FORMAT_VERSION bump: a reader
refuses fields it does not know, and the bump turns that refusal into "upgrade Tributary".

The settings sections (`curvature`, `data`, `model`, `config`) are the job config as dumped at index time,
kept as JSON objects and compared verbatim: typing them as today's config models would make an old store
unreadable whenever an option is renamed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import zarr
import zarr.errors
from pydantic import BaseModel, ConfigDict, ValidationError
from zarr.core.common import AccessModeLiteral

from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.store.location import join, redact, zarr_location
from engine.training_run.plan import RunPlan

# bump when a reader of an older version would misread what this one writes. 3: the fitted projection kinds
# (ProjectionSpec.fit_rows/top, the projection_in/projection_out arrays), which a version-2 reader cannot apply
# 4: every chunk ends in an xxh3 digest (engine.store.chunk_checksum), a codec a version-3 reader does not have
FORMAT_VERSION = 4
UNVERSIONED = 1  # stores written before `format_version` existed
ARRAY_CHECKSUMS_SINCE = 2  # stores of older versions hold no checksums of factors, preconditioners, row arrays
STORE_FORMAT = "tributary-store/1"
RUN_FORMAT = "tributary-run/1"

JsonObject = dict[str, Any]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Fingerprints(_Record):
    """sha256 of what the store was built from; a query or a resume with other inputs is refused."""

    model: str
    tokenizer: str
    dataset: str
    projection: str


class ShardCommit(_Record):
    """A shard's completion in one stage, as the driver committed it from the worker's receipt."""

    checksum: str | None  # of the rows written (gradients); None for stages that write no rows
    arrays: dict[str, str] = {}  # sha256 per row array of the shard ("grads", "rows/id", ...); {} before v2
    node: str
    pid: int
    seconds: float


class IndexRunRecord(_Record):
    """One `tributary index` run over the store: where it ran and which shards of each stage it computed."""

    started: str
    host: str
    workers: int
    computed: dict[str, list[int]] = {}


class SkippedRow(_Record):
    """A training row left out for non-finite values (data.on_nonfinite: skip): stored as zeros with loss 0,
    excluded from the curvature sums and never ranked by a query."""

    row: int
    id: str
    modules: list[str]  # the tracked modules (or "loss") whose part of the row was non-finite


class RunStoreSettings(_Record):
    dtype: str
    rows_per_chunk: int | None


class Manifest(_Record):
    """What both store kinds record."""

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]  # how messages name a store of this kind

    format: str
    format_version: int = FORMAT_VERSION
    store_id: str | None = None  # uuid4 written at creation (engine.store.identity); None in older stores
    projection: ProjectionSpec
    curvature: JsonObject
    complete: bool = False
    timings: dict[str, float] | None = None  # seconds per phase, written when the store completes
    # sha256 of each module's slice of every packed per-module array (factors, preconditioners) as written:
    # array path ("factors/lam", "segments/s0/preconditioner") -> module -> digest
    array_checksums: dict[str, dict[str, str]] = {}

    def updated(self, **changes: Any) -> Self:
        """A copy with `changes` applied, validated like a manifest read from disk (and sharing no objects
        with `self` or `changes`)."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        return self.model_validate(self.model_copy(update=changes).model_dump())

    def to_json(self) -> JsonObject:
        return self.model_dump(mode="json")


class StoreManifest(Manifest):
    """A single-checkpoint gradient store (also each checkpoint inside a training-run store)."""

    FORMAT: ClassVar[str] = STORE_FORMAT
    KIND: ClassVar[str] = "single-checkpoint store"

    format: Literal["tributary-store/1"] = STORE_FORMAT
    code_version: str
    fingerprints: Fingerprints
    data: JsonObject  # config.data without batch_size and train
    model: JsonObject  # config.model
    config: JsonObject  # the whole resolved config, store.path redacted
    rows: int
    width: int
    dtype: str  # logical row dtype (bfloat16 is kept as uint16 on disk)
    rows_per_chunk: int  # one shard = one row chunk
    completed_shards: list[int] = []  # gradient shards whose rows are written
    stages: dict[str, bool] = {}  # driver stages done: "eigen", "final"
    runs: list[IndexRunRecord] = []
    shards: dict[str, dict[int, ShardCommit]] = {}  # stage ("gradients", "lambdas", ...) -> shard -> commit
    skipped: list[SkippedRow] = []  # format 2: rows left out for non-finite values, by row (data.on_nonfinite)
    coverage: JsonObject = {}  # what the tracked modules cover (engine.capture.coverage); {} in older stores


class RunManifest(Manifest):
    """A training-run store: the resolved plan, shared by its checkpoint stores."""

    FORMAT: ClassVar[str] = RUN_FORMAT
    KIND: ClassVar[str] = "training-run store"

    format: Literal["tributary-run/1"] = RUN_FORMAT
    plan: RunPlan
    store: RunStoreSettings
    segments_done: list[int] = []


KINDS: dict[str, type[Manifest]] = {kind.FORMAT: kind for kind in (StoreManifest, RunManifest)}
M = TypeVar("M", bound=Manifest)


def raw_manifest(group: zarr.Group) -> JsonObject | None:
    manifest = group.attrs.get("manifest")
    return manifest if isinstance(manifest, dict) else None


def open_group(path: str, mode: AccessModeLiteral = "r") -> zarr.Group | None:
    """The Zarr group at `path`, or None where there is none; a TributaryError naming the path where its
    metadata cannot be read (a damaged zarr.json) or it holds an array."""
    try:
        return zarr.open_group(zarr_location(path), mode=mode)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError):
        return None
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsArrayAndGroupError):
        raise TributaryError(f"{redact(path)} is a Zarr array, not a Tributary store; check the store path") from None
    except (ValueError, TypeError, KeyError, AttributeError, PermissionError) as error:
        raise TributaryError(
            f"{redact(join(path, 'zarr.json'))} cannot be read ({type(error).__name__}: {error}); the store's "
            "metadata is damaged: remove the store and run `tributary index` again"
        ) from None


def stored_kind(path: str) -> type[Manifest] | None:
    """The kind of store at `path`, or None when there is no Tributary store there."""
    group = open_group(path)
    if group is None:
        return None
    name = (raw_manifest(group) or {}).get("format")
    return KINDS.get(name) if isinstance(name, str) else None


def parse_manifest(raw: JsonObject, kind: type[M], path: str) -> M:
    """The typed manifest of the store at `path`: the one reader of what `ManifestStore` writes."""
    version = raw.get("format_version", UNVERSIONED)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise TributaryError(
            f"store {redact(path)} was written by a newer Tributary (store format version {version}; this one "
            f"reads up to {FORMAT_VERSION}); upgrade Tributary to read it"
        )
    try:
        return kind.model_validate({**raw, "format_version": version})
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise TributaryError(
            f"the manifest of store {redact(path)} cannot be read ({where}: {problem['msg']}); it was written by "
            "another Tributary version or edited by hand: re-index it with `tributary index --overwrite`"
        ) from None


class ManifestStore(ABC, Generic[M]):
    """A Zarr group with a typed manifest in its attributes: kept in memory, written whole on every change.

    Each store object reads its manifest once, when opened, as Zarr does for the attributes (the driver
    is the only writer of a manifest: workers read the layout, which never changes).
    """

    def __init__(self, group: zarr.Group, path: str, manifest: M):
        self.group = group
        self.path = path
        self._manifest = manifest

    @property
    def manifest(self) -> M:
        return self._manifest

    def update_manifest(self, **changes: Any) -> None:
        self._manifest = self._manifest.updated(**changes)
        self.group.attrs["manifest"] = self._manifest.to_json()

    def record_checksums(self, group: str, digests: dict[str, dict[str, str]]) -> None:
        """Replace the recorded checksums of the arrays under `group` (a path in the store) with `digests`."""
        kept = {
            path: values
            for path, values in self._manifest.array_checksums.items()
            if path != group and not path.startswith(f"{group}/")
        }
        self.update_manifest(array_checksums={**kept, **digests})

    @staticmethod
    def _create_group(path: str, manifest: Manifest) -> zarr.Group:
        """An empty group at `path` (anything there is replaced) that holds `manifest` from the start, so a run
        that dies while the arrays are laid out still leaves a recognisable, incomplete store."""
        return zarr.open_group(zarr_location(path), mode="w", attributes={"manifest": manifest.to_json()})

    @classmethod
    @abstractmethod
    def create(cls, path: str, manifest: M) -> Self: ...

    @classmethod
    @abstractmethod
    def open(cls, path: str, mode: AccessModeLiteral = "r") -> Self: ...
