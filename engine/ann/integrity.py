"""`tributary info --verify` for the ANN index beside a store: each of its files against the digest recorded
when the build committed it."""

from __future__ import annotations

from engine.ann.layout import IndexRecord, damaged_files, index_location, read_record
from engine.errors import TributaryError
from engine.store.location import local_path


def index_problems(store_path: str) -> list[str]:
    """The damaged files of the finished index beside `store_path`; none where there is no index (or the store
    is not local, where there cannot be one)."""
    if local_path(store_path) is None:
        return []
    root = index_location(store_path)
    try:
        record = read_record(root / "index.json", IndexRecord, "ANN index", "run `tributary ann build` again")
    except TributaryError as error:
        return [str(error)]
    return [] if record is None else damaged_files(root, record)
