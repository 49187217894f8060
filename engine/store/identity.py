"""Which store a long-lived reader loaded, and whether the store at its path is still that one.

A store's identity is its `store_id` (a uuid4 written when the store is created) with its completion record
(the stages and shard checksums the driver recorded). A store written before stores had an id is known by
its completion record alone: the checksums of its rows, which a rebuilt store does not reproduce by chance.
`tributary serve` (and any caller that keeps an `Attributor`) compares the identity it loaded with the one
at the path before and after each scoring pass, so an `index --overwrite` under it is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

from engine.errors import TributaryError
from engine.store.location import redact
from engine.store.manifest import KINDS, Manifest, RunManifest, StoreManifest, open_group, parse_manifest, raw_manifest


class StoreChanged(TributaryError):
    """The store a reader loaded was replaced, removed or is being rewritten since it was loaded."""


def new_store_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class StoreIdentity:
    store_id: str | None  # None: a store written before stores had an id
    completion: str  # sha256 of the completion record

    def describe(self) -> str:
        shown = self.store_id if self.store_id is not None else "none (an older store)"
        return f"store id {shown}, completion record {self.completion[:12]}"


def completion_record(manifest: Manifest) -> dict:
    """What the driver recorded as done: it changes with every shard written and is fixed once complete."""
    if isinstance(manifest, StoreManifest):
        return {
            "complete": manifest.complete,
            "completed_shards": manifest.completed_shards,
            "stages": manifest.stages,
            "shards": {
                stage: {str(shard): commit.checksum for shard, commit in sorted(commits.items())}
                for stage, commits in sorted(manifest.shards.items())
            },
        }
    if isinstance(manifest, RunManifest):
        return {"complete": manifest.complete, "segments_done": manifest.segments_done}
    raise TypeError(f"no completion record for {type(manifest).__name__}")


def identity_of(manifest: Manifest) -> StoreIdentity:
    record = json.dumps(completion_record(manifest), sort_keys=True).encode()
    return StoreIdentity(manifest.store_id, hashlib.sha256(record).hexdigest())


def identity_at(path: str) -> StoreIdentity | None:
    """The identity of the complete store at `path` as it is on disk now; None where there is no complete
    Tributary store there (removed, or being rewritten). Raises TributaryError where it cannot be read."""
    group = open_group(path)
    if group is None:
        return None
    raw = raw_manifest(group)
    name = raw.get("format") if raw is not None else None
    kind = KINDS.get(name) if isinstance(name, str) else None
    if raw is None or kind is None:
        return None
    manifest = parse_manifest(raw, kind, path)
    return identity_of(manifest) if manifest.complete else None


def check_unchanged(path: str, loaded: StoreIdentity, reader: str = "it") -> None:
    """Raise StoreChanged, naming the change, unless the store at `path` is still the one `loaded` describes."""
    where = redact(path)
    try:
        current = identity_at(path)
    except TributaryError as error:
        raise StoreChanged(f"store {where} can no longer be read since {reader} loaded it ({error})") from None
    if current is None:
        raise StoreChanged(
            f"store {where} was removed or is being rewritten (no complete store there) since {reader} loaded it "
            f"({loaded.describe()}); retry once `tributary index` has finished, after restarting {reader}"
        )
    if current != loaded:
        raise StoreChanged(
            f"store {where} was replaced since {reader} loaded it (loaded: {loaded.describe()}; now: "
            f"{current.describe()}); restart {reader} to serve the new store"
        )
