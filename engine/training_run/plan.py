"""A resolved description of a training run: checkpoints, segments, learning rates, steps, datasets.

Pure data, shared by the LM path (built from the config by `engine.training_run.resolve`) and the
in-memory path (built by the caller). A store without a training run is one checkpoint in one segment.

Conventions. Checkpoints are ordered by training time; the last one is the final model θ^s (queries
of final-model methods are taken there). Segment ℓ covers K_ℓ optimizer steps with mean *effective*
learning rate η̄_ℓ (η/(1−β) for SGD with momentum β; Adam's preconditioner is separate). Each segment
trains on one dataset; several segments may share a dataset (one run) or not (continual training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.training_run.keys import ResourceKey


@dataclass(frozen=True)
class CheckpointPlan:
    name: str  # "c0", "c1", ...: the group name of its rows and factors in a store (`key.group_name`)
    segment: int
    path: str | None = None
    learning_rate: float | None = None  # effective η at this checkpoint (TracInCP's η_c)
    step: int | None = None

    @property
    def key(self) -> ResourceKey:
        return ResourceKey.parse(self.name)

    @property
    def weights(self) -> str:
        """The checkpoint's weights; only plans built for in-memory attribution leave them out."""
        if self.path is None:
            raise ValueError(f"checkpoint {self.name} of this training-run plan has no weights path")
        return self.path


@dataclass(frozen=True)
class SegmentPlan:
    index: int
    checkpoints: tuple[str, ...]  # the checkpoints' names
    eta: float | None  # mean effective learning rate η̄_ℓ over the segment's steps
    steps: int | None  # K_ℓ
    dataset: int = 0

    @property
    def key(self) -> ResourceKey:
        """Key of the segment's own factors (averaged over its checkpoints) and preconditioner."""
        return ResourceKey.segment(self.index)

    @property
    def averaged(self) -> ResourceKey:
        """Key of the Fast-Source rows/factors: gradients at the segment's averaged parameters."""
        return ResourceKey.averaged(self.index)

    @property
    def checkpoint_keys(self) -> tuple[ResourceKey, ...]:
        return tuple(ResourceKey.parse(name) for name in self.checkpoints)


@dataclass(frozen=True)
class RunPlan:
    checkpoints: tuple[CheckpointPlan, ...]
    segments: tuple[SegmentPlan, ...]
    datasets: tuple[str, ...] = ("train",)
    optimizer: str = "sgd"
    preconditioned: bool = False  # Adam: Source uses P·H with P from the optimizer state
    averaged: bool = False  # Fast-Source rows and factors exist

    @classmethod
    def single(cls, eta: float | None = None, steps: int | None = None, path: str | None = None) -> RunPlan:
        """The plan of a store built without a training run: the final model only."""
        name = ResourceKey.checkpoint(0).group_name
        return cls(checkpoints=(CheckpointPlan(name, 0, path),), segments=(SegmentPlan(0, (name,), eta, steps),))

    @property
    def final(self) -> CheckpointPlan:
        return self.checkpoints[-1]

    @property
    def multi(self) -> bool:
        return len(self.checkpoints) > 1 or self.averaged

    def checkpoint(self, key: ResourceKey | str) -> CheckpointPlan:
        """The checkpoint of a key or a name ("c0")."""
        name = key.group_name if isinstance(key, ResourceKey) else key
        return next(c for c in self.checkpoints if c.name == name)

    def dataset_of(self, key: ResourceKey) -> int:
        """Which dataset the rows under `key` (a checkpoint or an averaged segment) belong to."""
        if key.kind == "checkpoint":
            return self.segments[self.checkpoint(key).segment].dataset
        if key.kind == "averaged":
            return self.segments[key.index].dataset
        raise KeyError(f"{key} holds no rows (segments hold factors and preconditioners)")

    def fits_own_factors(self, segment: SegmentPlan) -> bool:
        """Whether the segment has factors of its own: a segment of one checkpoint uses that checkpoint's,
        unless the run is preconditioned (its factors are then those of P̄^{1/2} H P̄^{1/2})."""
        return len(segment.checkpoints) > 1 or self.preconditioned

    def to_dict(self) -> dict:
        return {
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "segments": [dict(asdict(s), checkpoints=list(s.checkpoints)) for s in self.segments],
            "datasets": list(self.datasets),
            "optimizer": self.optimizer,
            "preconditioned": self.preconditioned,
            "averaged": self.averaged,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> RunPlan:
        return cls(
            checkpoints=tuple(CheckpointPlan(**c) for c in raw["checkpoints"]),
            segments=tuple(SegmentPlan(**{**s, "checkpoints": tuple(s["checkpoints"])}) for s in raw["segments"]),
            datasets=tuple(raw["datasets"]),
            optimizer=raw["optimizer"],
            preconditioned=raw["preconditioned"],
            averaged=raw["averaged"],
        )
