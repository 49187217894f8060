"""training_run: the checkpoints, segments and optimizer of a training run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config.section import Section as _Section


class CheckpointConfig(_Section):
    path: str = Field(description="HF model directory of this checkpoint")
    learning_rate: float | None = Field(
        default=None, gt=0, description="learning rate at this checkpoint (TracInCP's η_c)"
    )
    step: int | None = Field(default=None, ge=0, description="optimizer step of this checkpoint")


class SegmentConfig(_Section):
    checkpoints: list[str | int] = Field(
        description="the segment's checkpoints: paths or indices into training_run.checkpoints"
    )
    steps: int | None = Field(default=None, gt=0, description="optimizer steps K in the segment (default: from steps)")
    learning_rate: float | None = Field(default=None, gt=0, description="mean learning rate over the segment")
    data: str | None = Field(
        default=None, description="this stage's training JSONL (continual training); default data.train"
    )


class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum β: Source uses η/(1-β)")
    preconditioned: bool = Field(
        default=False,
        description="adam/adamw: Source with P·H, P = 1/(sqrt(v̂)+eps) from each checkpoint's optimizer state",
    )
    state_file: str = Field(default="optimizer.pt", description="optimizer state file inside each checkpoint directory")
    beta2: float | None = Field(default=None, gt=0, lt=1, description="Adam β2 (default: from the optimizer state)")
    eps: float | None = Field(default=None, gt=0, description="Adam ε (default: from the optimizer state)")


class TrainingRunConfig(_Section):
    checkpoints: list[str | CheckpointConfig] = Field(
        default_factory=list, description="checkpoints in training order: HF directories or {path, learning_rate, step}"
    )
    trainer_dir: str | None = Field(
        default=None,
        description="an HF Trainer output_dir: its checkpoint-STEP directories (and the final model in the "
        "directory itself), learning rates from trainer_state.json",
    )
    segments: int | list[SegmentConfig] = Field(
        default=1, description="number of equal groups of checkpoints, or the segments/stages listed"
    )
    boundaries: list[int] | None = Field(
        default=None,
        description="stage boundaries in optimizer steps (instead of segments): checkpoint steps in "
        "(T_l-1, T_l] form segment l",
    )
    learning_rate: float | None = Field(
        default=None, gt=0, description="constant learning rate, when not given otherwise"
    )
    total_steps: int | None = Field(
        default=None, gt=0, description="the step the last segment ends at (default: its last checkpoint's step)"
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    averaged: bool = Field(default=False, description="also index each segment's averaged parameters (Fast-Source)")
