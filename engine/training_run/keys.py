"""Which set of rows, factors or preconditioner a method asks for: a checkpoint, a segment or a segment's
averaged parameters, by index in the run plan.

`group_name` is the name the store gives it on disk ("c0", "s1", "avg0"): the sub-store
checkpoints/<name> of a checkpoint or averaged segment, the group segments/<name> of a segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ResourceKind = Literal["checkpoint", "segment", "averaged"]

PREFIXES: dict[ResourceKind, str] = {"checkpoint": "c", "segment": "s", "averaged": "avg"}
_KINDS: dict[str, ResourceKind] = {prefix: kind for kind, prefix in PREFIXES.items()}
_NAME = re.compile(r"^(c|s|avg)(\d+)$")


@dataclass(frozen=True)
class ResourceKey:
    kind: ResourceKind
    index: int

    @classmethod
    def checkpoint(cls, index: int) -> ResourceKey:
        return cls("checkpoint", index)

    @classmethod
    def segment(cls, index: int) -> ResourceKey:
        """A segment's curvature: factors averaged over its checkpoints, its preconditioner P̄."""
        return cls("segment", index)

    @classmethod
    def averaged(cls, index: int) -> ResourceKey:
        """Fast-Source: rows and factors at a segment's averaged parameters."""
        return cls("averaged", index)

    @classmethod
    def parse(cls, name: str) -> ResourceKey:
        """The key of an on-disk name ("c0", "s1", "avg0")."""
        match = _NAME.match(name)
        if match is None:
            raise ValueError(
                f"{name!r} names no checkpoint (c0, c1, ...), segment (s0, ...) or averaged segment (avg0, ...)"
            )
        return cls(_KINDS[match.group(1)], int(match.group(2)))

    @classmethod
    def of(cls, key: ResourceKey | str) -> ResourceKey:
        """A key as is, a name parsed (for callers that name resources as the store does)."""
        return key if isinstance(key, ResourceKey) else cls.parse(key)

    @property
    def group_name(self) -> str:
        return f"{PREFIXES[self.kind]}{self.index}"

    def __str__(self) -> str:
        return self.group_name
