"""Opening stores: any store for reading, and the store an index run writes (resumed, replaced or created)."""

from __future__ import annotations

from typing import TypeVar

from engine.errors import TributaryError
from engine.store import location
from engine.store.compatibility import resume_refusal
from engine.store.identity import new_store_id
from engine.store.manifest import Manifest, ManifestStore, stored_kind
from engine.store.run_store import RunStore, is_run_store
from engine.store.zarr_store import GradientStore

S = TypeVar("S", bound=ManifestStore)


def open_store(path: str) -> GradientStore | RunStore:
    """The store at `path`, read-only, of whichever kind it is."""
    return RunStore.open(path) if is_run_store(path) else GradientStore.open(path)


def open_or_create(kind: type[S], path: str, manifest: Manifest, overwrite: bool) -> tuple[S, bool]:
    """(store, resumed) for an index run that wants a `kind` store built as `manifest` says.

    A store of that kind built from the same inputs and settings is resumed (a complete one is returned
    as is); with `overwrite` any Tributary store at `path` is replaced. Anything else is refused: another
    store without --overwrite, and, even with it, a path holding files that are not a Tributary store
    (creating the store would delete them). A created store gets a new store id. The caller holds the
    store's lock.
    """
    if not _vacant(path):
        existing = stored_kind(path)
        if existing is None:
            raise TributaryError(
                f"store.path {location.redact(path)} already exists and is not a Tributary store; creating the "
                "store would delete what is there. Choose another store.path (or remove it yourself)"
            )
        if overwrite:
            location.remove(path)
        elif existing is not type(manifest):
            raise TributaryError(
                f"store.path {location.redact(path)} holds a {existing.KIND}; choose another store.path for the "
                f"{manifest.KIND}, or pass --overwrite to replace it"
            )
        else:
            opened = kind.open(path, mode="r+")
            refusal = resume_refusal(opened.manifest, manifest, path)
            if refusal is not None:
                raise TributaryError(refusal)
            return opened, True
    return kind.create(path, manifest.updated(store_id=new_store_id())), False


def _vacant(path: str) -> bool:
    """Nothing at `path`, or an empty directory (creating a store there loses nothing)."""
    if not location.exists(path):
        return True
    fs, root = location.filesystem(path)
    return fs.isdir(root) and not fs.ls(root, detail=False)
