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

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class CheckpointPlan:
    name: str  # "c0", "c1", ...: the key of its rows and factors in a store
    segment: int
    path: str | None = None
    learning_rate: float | None = None  # effective η at this checkpoint (TracInCP's η_c)
    step: int | None = None


@dataclass(frozen=True)
class SegmentPlan:
    index: int
    checkpoints: tuple[str, ...]
    eta: float | None  # mean effective learning rate η̄_ℓ over the segment's steps
    steps: int | None  # K_ℓ
    dataset: int = 0

    @property
    def averaged(self) -> str:
        """Key of the Fast-Source rows/factors: gradients at the segment's averaged parameters."""
        return f"avg{self.index}"


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
        return cls(checkpoints=(CheckpointPlan("c0", 0, path),), segments=(SegmentPlan(0, ("c0",), eta, steps),))

    @property
    def final(self) -> CheckpointPlan:
        return self.checkpoints[-1]

    @property
    def multi(self) -> bool:
        return len(self.checkpoints) > 1 or self.averaged

    def checkpoint(self, name: str) -> CheckpointPlan:
        return next(c for c in self.checkpoints if c.name == name)

    def dataset_of(self, key: str) -> int:
        """Which dataset the rows under `key` (a checkpoint or an averaged segment) belong to."""
        for segment in self.segments:
            if key == segment.averaged or key in segment.checkpoints:
                return segment.dataset
        raise KeyError(key)

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
            segments=tuple(SegmentPlan(**dict(s, checkpoints=tuple(s["checkpoints"]))) for s in raw["segments"]),
            datasets=tuple(raw["datasets"]),
            optimizer=raw["optimizer"],
            preconditioned=raw["preconditioned"],
            averaged=raw["averaged"],
        )
