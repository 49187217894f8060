"""Where rows come from: a JSONL file, Parquet files (one path or a glob), or a directory written by `datasets`'
`save_to_disk` (Arrow stream files). Arrow and Parquet rows are read in record batches, by row range, so neither
the driver nor a worker holds the whole dataset; JSONL files are read whole, as they always were.

Bad rows are errors naming the file and the row number within it (1-based), like a JSONL file:line.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import TributaryError

ROWS_PER_BATCH = 4096  # what one read materialises: the rows of at most one record batch or row group
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class ArrowFile:
    """One Parquet or Arrow stream file and the rows it holds."""

    path: Path
    rows: int
    parquet: bool


@dataclass(frozen=True)
class TableSource:
    """Parquet files or a save_to_disk directory: the files in row order, each with its row count."""

    given: str
    files: tuple[ArrowFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def fingerprint(self) -> str:
        """A hash of every data file's bytes, in order (datasets' own `_fingerprint` also changes with
        operations that leave the rows alone, so the bytes decide)."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.path.name.encode() + b"\0")
            with open(file.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def column_names(self) -> list[str]:
        """The first file's columns (the files of one source share a schema)."""
        if not self.files:
            return []
        first = self.files[0]
        if first.parquet:
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(first.path).schema_arrow.names)
        return list(_stream_batches(first.path).schema.names)

    def records(self, start: int, stop: int, columns: list[str]) -> Iterator[tuple[Path, int, dict]]:
        """(file, row number in the file from 1, record without null fields) for rows start..stop-1 of the
        whole source, reading only the record batches or row groups that hold them."""
        offset = 0
        for file in self.files:
            if offset >= stop:
                return
            if offset + file.rows > start:
                first = max(start - offset, 0)
                last = min(stop - offset, file.rows)
                for number, record in _file_records(file, first, last, columns):
                    yield file.path, number, record
            offset += file.rows


def is_table_source(path: str) -> bool:
    """Parquet (a .parquet file or a glob that matches files) or a save_to_disk directory, rather than a JSONL
    file. A path that exists is taken literally, brackets and all."""
    given = Path(path)
    if given.exists():
        return given.is_dir() or path.endswith(".parquet")
    return path.endswith(".parquet") or (_is_pattern(path) and bool(glob.glob(path)))


def _is_pattern(path: str) -> bool:
    return any(c in path for c in GLOB_CHARACTERS) and not Path(path).exists()


def open_table_source(path: str, what: str) -> TableSource:
    """The files of a Parquet path or glob, or of a save_to_disk directory; a clear error for anything else."""
    if _is_pattern(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise TributaryError(f"{what} {path} matches no files; check the pattern")
        return TableSource(path, tuple(_parquet_file(Path(m), what, path) for m in matches))
    given = Path(path)
    if given.is_dir():
        return TableSource(path, _saved_dataset_files(given, what))
    if not given.is_file():
        raise TributaryError(f"{what} {path} does not exist; check the path")
    return TableSource(path, (_parquet_file(given, what, path),))


def _parquet_file(path: Path, what: str, given: str) -> ArrowFile:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise TributaryError(f"{what} {given}: {path} is not a regular file; the pattern must match Parquet files")
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except OSError as error:
        raise TributaryError(f"{what} {path} cannot be read as Parquet ({error}); give Parquet files") from None
    except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) for a file that is not Parquet
        raise TributaryError(f"{what} {path} is not a Parquet file ({error}); give Parquet files") from None
    return ArrowFile(path, rows, parquet=True)


def _saved_dataset_files(directory: Path, what: str) -> tuple[ArrowFile, ...]:
    """The Arrow files of one `Dataset.save_to_disk` directory, in the order its state.json lists them."""
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
        raise TributaryError(
            f"{what} {directory} holds a DatasetDict (splits {', '.join(splits)}); point {what} at one split's "
            f"directory, e.g. {directory / (splits[0] if splits else 'train')}"
        )
    state = directory / "state.json"
    if not state.is_file():
        raise TributaryError(
            f"{what} {directory} is a directory but not one written by datasets' save_to_disk (no state.json); give "
            "such a directory, a Parquet file or glob (e.g. data/*.parquet), or a JSONL file"
        )
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TributaryError(f"{what} {state} cannot be read ({error}); save the dataset again") from None
    files = []
    for name in names:
        path = directory / name
        try:
            files.append(ArrowFile(path, sum(batch.num_rows for batch in _stream_batches(path)), parquet=False))
        except OSError as error:
            raise TributaryError(f"{what} {path} cannot be read ({error}); save the dataset again") from None
    return tuple(files)


def _stream_batches(path: Path):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path)))


def _file_records(file: ArrowFile, first: int, last: int, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """(row number from 1, record) for rows first..last-1 of one file (0-based), a batch at a time."""
    for offset, batch in _batches_from(file, first, columns):
        if offset >= last:
            return
        lo, hi = max(first - offset, 0), min(last - offset, batch.num_rows)
        if hi <= lo:
            continue
        for position, record in enumerate(batch.slice(lo, hi - lo).to_pylist()):
            yield offset + lo + position + 1, {k: v for k, v in record.items() if v is not None}


def _batches_from(file: ArrowFile, first: int, columns: list[str]):
    """(offset of the batch in the file, batch) from the batch holding row `first` on; Parquet row groups before
    it are skipped by their metadata, unread (Arrow stream batches are memory-mapped, so skipping them is free)."""
    if file.parquet:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file.path)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        offset = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if offset + rows > first:
                for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[group], columns=present):
                    yield offset, batch
                    offset += batch.num_rows
            else:
                offset += rows
        return
    offset = 0
    for batch in _stream_batches(file.path):
        if offset + batch.num_rows > first:
            yield offset, batch.select([c for c in columns if c in batch.schema.names])
        offset += batch.num_rows
