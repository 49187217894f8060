"""`tributary ann build STORE`: train the IVF cells and codec on a sample of rows, encode the rows batch by batch,
and assemble the index — each step kept on disk, so a killed build resumes where it stopped.

Rows the store skipped (manifest.skipped, non-finite gradients stored as zeros) are left out of the index, so
they are never ranked. The index is written under a name of its own and committed by writing index.json last.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.ann.layout import (
    METRICS,
    BuildPlan,
    IndexRecord,
    IndexSettings,
    Metric,
    default_batch_rows,
    default_lists,
    default_probes,
    faiss_module,
    file_digest,
    index_location,
    read_record,
    use_gpus,
    write_atomically,
    write_json,
)
from engine.errors import TributaryError
from engine.progress import progress_bar
from engine.store import GradientStore
from engine.store.identity import identity_at, identity_of
from engine.store.location import redact
from engine.store.opening import open_store
from engine.store.space import is_disk_full, out_of_space
from engine.testing.faults import fault_point

log = logging.getLogger(__name__)
SAMPLE_SEED = 0


def indexed_store(path: str) -> GradientStore:
    """The rows an index at `path` covers: a single-checkpoint store's, or a training run's final checkpoint's
    (the rows the single-term methods scan). Refused unless complete."""
    opened = open_store(path)
    if not opened.manifest.complete:
        raise TributaryError(
            f"store {redact(path)} is incomplete; finish it with `tributary index` before `tributary ann build`"
        )
    return opened.final_store()


def normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def metric_rows(rows: np.ndarray, metric: Metric) -> np.ndarray:
    """What the metric's index holds of `rows`: the raw rows, or their unit-normalised copies, as float32."""
    rows = np.asarray(rows, dtype=np.float32)
    return np.ascontiguousarray(normalised(rows) if metric == "cos" else rows)


def build_plan(store: GradientStore, settings: IndexSettings) -> BuildPlan:
    identity = identity_of(store.manifest)
    return BuildPlan(
        store_id=identity.store_id,
        completion=identity.completion,
        rows=store.rows,
        width=store.manifest.width,
        settings=settings,
    )


def build_index(
    store_path: str,
    metrics: tuple[Metric, ...] | None = None,
    codec: str = "SQ8",
    lists: int | None = None,
    probes: int | None = None,
    show_progress: bool = True,
    batch_rows: int | None = None,
    row_copy: bool = True,
) -> IndexRecord:
    """Build (or resume, or find up to date) the index beside the store at `store_path`."""
    store = indexed_store(store_path)
    root = index_location(store_path)
    plan = build_plan(store, _settings(store, metrics, codec, lists, probes, batch_rows, row_copy))
    finished = read_record(root / "index.json", IndexRecord, "ANN index", f"run `tributary ann build {store_path}`")
    if finished is not None and finished.plan == plan:
        log.info("the ANN index at %s is up to date", root)
        return finished
    build = Builder(store, root / "build", plan, show_progress)
    try:
        record = build.run()
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise out_of_space(
            f"ANN index {root}",
            error,
            build.bytes_still_needed(),
            f"run `tributary ann build {store_path}` again: it keeps the batches already encoded and does the rest",
        ) from None
    if identity_at(store.path) != plan.identity:
        raise TributaryError(
            f"store {redact(store_path)} changed while its ANN index was built; run `tributary ann build "
            f"{store_path}` again once the store is complete"
        )
    write_json(root / "index.json", record)  # the commit point
    shutil.rmtree(root / "build", ignore_errors=True)
    for stale in root.glob("*.faiss"):
        if stale.name not in record.files.values():
            stale.unlink(missing_ok=True)
    for stale in root.glob("rows-*.npy"):
        if stale.name != record.rows:
            stale.unlink(missing_ok=True)
    return record


def _settings(
    store: GradientStore,
    metrics: tuple[Metric, ...] | None,
    codec: str,
    lists: int | None,
    probes: int | None,
    batch_rows: int | None,
    row_copy: bool,
) -> IndexSettings:
    kept = store.rows - len(store.manifest.skipped)
    if kept <= 0:
        raise TributaryError(f"store {redact(store.path)} has no rows to index (every row was skipped)")
    if lists is not None and not 0 < lists <= kept:
        raise TributaryError(f"--lists must be between 1 and the {kept} indexed rows, got {lists}")
    lists = default_lists(kept) if lists is None else lists
    if probes is not None and not 0 < probes <= lists:
        raise TributaryError(f"--probes must be between 1 and the {lists} lists, got {probes}")
    if batch_rows is not None and batch_rows <= 0:
        raise TributaryError(f"--batch-rows must be positive, got {batch_rows}")
    chunk = store.rows_per_chunk
    return IndexSettings(
        metrics=metrics or METRICS,
        codec=codec,
        lists=lists,
        probes=default_probes(lists) if probes is None else probes,
        train_rows=min(kept, 40 * lists),
        batch_rows=default_batch_rows(store.manifest.width, chunk)
        if batch_rows is None
        else -(-batch_rows // chunk) * chunk,
        row_copy=row_copy,
    )


class Builder:
    """One build's steps, each skipped when its result is already on disk under a matching plan."""

    def __init__(self, store: GradientStore, directory: Path, plan: BuildPlan, show_progress: bool):
        self.store = store
        self.directory = directory
        self.plan = plan
        self.show_progress = show_progress
        self.faiss = faiss_module()
        self.skipped = np.array(sorted(row.row for row in store.manifest.skipped), dtype=np.int64)
        self.seconds: dict[str, float] = {}
        self._sample: np.ndarray | None = None

    def run(self) -> IndexRecord:
        self._start_or_resume()
        started = time.perf_counter()
        trained = {metric: self._trained(metric) for metric in self.plan.settings.metrics}
        self.seconds["train"] = time.perf_counter() - started
        started = time.perf_counter()
        self._encode_batches(trained)
        self.seconds["encode"] = time.perf_counter() - started
        started = time.perf_counter()
        files, indexed = self._assemble()
        rows = self._publish_rows()
        root = self.directory.parent
        digests = {name: file_digest(root / name) for name in [*files.values(), *([rows] if rows else [])]}
        self.seconds["assemble"] = time.perf_counter() - started
        return IndexRecord(
            plan=self.plan,
            files=files,
            rows=rows,
            indexed_rows=indexed,
            faiss_version=str(self.faiss.__version__),
            seconds={key: round(value, 3) for key, value in self.seconds.items()},
            digests=digests,
        )

    # ---- steps --------------------------------------------------------------------------------------
    def _start_or_resume(self) -> None:
        plan_path = self.directory / "plan.json"
        found = read_record(plan_path, BuildPlan, "ANN build plan", f"remove {self.directory} and build again")
        if found == self.plan:
            done = len(list((self.directory / "codes").glob("*.npz")))
            log.info(
                "resuming the ANN build in %s (%d of %d batches encoded)", self.directory, done, len(self._batches())
            )
            return
        if found is not None:
            log.info("the build in %s was for another store or other settings; starting again", self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        write_json(plan_path, self.plan)

    def _batches(self) -> list[tuple[int, int]]:
        """The row ranges encoded and committed one at a time: batch_rows rows each (whole store chunks)."""
        step, rows = self.plan.settings.batch_rows, self.store.rows
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def _trained(self, metric: Metric):
        """The metric's empty index with its cells and codec trained (read back when a resumed build has it)."""
        path = self.directory / f"{metric}.trained.faiss"
        if path.exists():
            return self.faiss.read_index(str(path))
        settings = self.plan.settings
        try:
            index = self.faiss.index_factory(
                self.plan.width, f"IVF{settings.lists},{settings.codec}", self.faiss.METRIC_INNER_PRODUCT
            )
        except RuntimeError:
            raise TributaryError(
                f"--codec {settings.codec} is not a FAISS IVF codec for rows of width {self.plan.width}; use SQ8, "
                "SQ4, Flat or PQ<m> with m dividing the width"
            ) from None
        sample = metric_rows(self._training_sample(), metric)
        if use_gpus(self.faiss):
            gpu_index = self.faiss.index_cpu_to_all_gpus(index)
            gpu_index.train(sample)
            index = self.faiss.index_gpu_to_cpu(gpu_index)
        else:
            index.train(sample)
        write_atomically(path, bytes(self.faiss.serialize_index(index)))
        return index

    def _training_sample(self) -> np.ndarray:
        """About train_rows rows from chunks spread evenly over the store (skipped rows left out)."""
        if self._sample is None:
            shards = self.store.shards()
            wanted = self.plan.settings.train_rows
            per_chunk = max(1, self.store.rows_per_chunk)
            picks = np.unique(np.linspace(0, len(shards) - 1, min(len(shards), -(-wanted // per_chunk) + 1)).round())
            pieces = []
            for start, stop, rows in self.store.iter_chunks([shards[int(i)] for i in picks]):
                pieces.append(rows[~np.isin(np.arange(start, stop), self.skipped)])
            sample = np.concatenate(pieces)
            if len(sample) > wanted:
                chosen = np.random.default_rng(SAMPLE_SEED).choice(len(sample), wanted, replace=False)
                sample = sample[np.sort(chosen)]
            self._sample = sample
        return self._sample

    def _encode_batches(self, trained: dict) -> None:
        """Each batch's codes per metric, with its row numbers, in codes/<start>.npz."""
        codes = self.directory / "codes"
        pending = [(start, stop) for start, stop in self._batches() if not (codes / f"{start}.npz").exists()]
        committed = 0
        copy = self._row_copy() if pending else None
        with progress_bar(self.show_progress) as bars:
            task = bars.add_task("encoding rows", total=self.store.rows)
            bars.advance(task, self.store.rows - sum(stop - start for start, stop in pending))
            for start, stop, rows in self.store.iter_chunks(pending):
                keep = ~np.isin(np.arange(start, stop), self.skipped)
                arrays: dict[str, Any] = {"ids": np.arange(start, stop, dtype=np.int64)[keep]}
                for metric, index in trained.items():
                    arrays[metric] = index.sa_encode(metric_rows(rows[keep], metric))
                if copy is not None:
                    copy[start:stop] = rows
                    copy.flush()  # on disk before the batch is committed
                buffer = io.BytesIO()
                np.savez(buffer, **arrays)
                write_atomically(codes / f"{start}.npz", buffer.getvalue())
                committed += 1
                bars.advance(task, stop - start)
                fault_point("driver", "ann", committed)

    def _row_copy(self) -> np.memmap | None:
        """The row copy being written (build/rows.npy), opened for writing; None without one."""
        if not self.plan.settings.row_copy:
            return None
        path = self.directory / "rows.npy"
        created = not path.exists()
        if not created:
            copy = np.lib.format.open_memmap(path, mode="r+")
        else:
            dtype = np.float64 if self.store.manifest.dtype == "float64" else np.float32
            copy = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(self.store.rows, self.plan.width))
        try:  # a page written through the map on a full disk kills the process (SIGBUS): claim the space first
            with open(path, "r+b") as handle:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            del copy
            if created:  # holds no rows yet; one that does keeps them (a rerun with space allocates the rest)
                path.unlink()
            raise OSError(error.errno, error.strerror, str(path)) from None
        return copy

    def bytes_still_needed(self) -> int:
        """What the rest of the build writes (estimated from its plan): the batches' codes not committed yet,
        the assembled index files, and the row copy where it is not allocated yet."""
        settings, rows, width = self.plan.settings, self.store.rows, self.plan.width
        codes = self.directory / "codes"
        pending = sum(stop - start for start, stop in self._batches() if not (codes / f"{start}.npz").exists())
        code_bytes = 0
        for metric in settings.metrics:
            trained = self.directory / f"{metric}.trained.faiss"
            code_bytes += self.faiss.read_index(str(trained)).sa_code_size() if trained.exists() else 4 * width
        needed = pending * (8 + code_bytes) + rows * (8 + code_bytes) + 4 * width * settings.lists
        copy = self.directory / "rows.npy"
        if settings.row_copy and not copy.exists():
            needed += rows * width * (8 if self.store.manifest.dtype == "float64" else 4)
        return needed

    def _publish_rows(self) -> str | None:
        if not self.plan.settings.row_copy:
            return None
        name = f"rows-{self.plan.build_id}.npy"
        if (self.directory / "rows.npy").exists() or not (self.directory.parent / name).exists():
            (self.directory / "rows.npy").replace(self.directory.parent / name)  # else a killed run moved it
        return name

    def _assemble(self) -> tuple[dict[Metric, str], int]:
        """Every batch's codes added to each metric's trained index, written as <metric>-<build>.faiss."""
        files: dict[Metric, str] = {}
        indexed = 0
        for metric in self.plan.settings.metrics:
            index = self.faiss.read_index(str(self.directory / f"{metric}.trained.faiss"))
            for start, _ in self._batches():
                with np.load(self.directory / "codes" / f"{start}.npz") as chunk:
                    if len(chunk["ids"]):
                        index.add_sa_codes(chunk[metric], chunk["ids"])
            name = f"{metric}-{self.plan.build_id}.faiss"
            # written from memory by Python, not by FAISS's own fwrite: a full disk is then an OSError, not
            # FAISS's RuntimeError, and a failed write leaves no file
            write_atomically(self.directory.parent / name, self.faiss.serialize_index(index).data)
            files[metric] = name
            indexed = int(index.ntotal)
        return files, indexed
