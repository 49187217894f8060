"""Before a run takes the writer lock or creates anything: can the store (and its lock beside it) be
created at store.path? A local path is checked by creating and removing a directory where the store's
parent would go, which is the only test that also holds for root (permissions alone do not stop root;
a read-only mount or /proc does)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.errors import TributaryError
from engine.store.location import local_path, redact


def _first_existing(path: Path) -> Path:
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def check_store_location(location: str) -> None:
    """A TributaryError naming store.path when its store cannot be created there; remote URLs pass (an
    object store has no folders to check, and its own errors name the bucket)."""
    local = local_path(location)
    if local is None:
        return
    parent = Path(os.path.abspath(local)).parent
    existing = _first_existing(parent)
    if not existing.is_dir():
        raise TributaryError(
            f"store.path {redact(location)} is under {existing}, which is a file, not a directory; "
            "choose a store.path whose parent folders are directories"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tributary-write-check-", dir=existing))
    except OSError as error:
        raise TributaryError(
            f"store.path {redact(location)} cannot be written: creating a directory in {existing} failed "
            f"({error.strerror}); choose a store.path on a writable file system"
        ) from None
