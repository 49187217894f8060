"""The training run behind a store: checkpoints, segments, learning rates, optimizer state."""

from engine.training_run.keys import ResourceKey
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan

__all__ = ["CheckpointPlan", "ResourceKey", "RunPlan", "SegmentPlan"]
