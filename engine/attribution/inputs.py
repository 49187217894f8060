"""What a caller of in-memory attribution supplies: datasets, the training run's checkpoints and segments,
and the settings (projection, curvature, labels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Dataset:
    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Checkpoint:
    """Parameters by name (as `model.named_parameters()`), the learning rate there (TracInCP's η_c), and
    for the Adam variant the second moments by parameter name and the optimizer step (bias correction)."""

    parameters: Mapping[str, Tensor]
    learning_rate: float | None = None
    exp_avg_sq: Mapping[str, Tensor] | None = None
    step: int | None = None


@dataclass
class Segment:
    """Checkpoints sampled along K = `steps` optimizer steps of mean learning rate `eta` on `data`."""

    checkpoints: Sequence[Checkpoint]
    data: Dataset
    eta: float | None = None
    steps: int | None = None


@dataclass
class TrainingRun:
    segments: Sequence[Segment]
    optimizer: str = "sgd"  # "sgd" (momentum β: η/(1−β)) or "adam"
    momentum: float = 0.0
    preconditioned: bool = False  # Adam: Source with P·H, P from the checkpoints' exp_avg_sq
    beta2: float = 0.999
    eps: float = 1e-8
    averaged: bool = False  # Fast-Source: also compute at each segment's averaged parameters

    @classmethod
    def final_only(cls, parameters: Mapping[str, Tensor], data: Dataset) -> TrainingRun:
        return cls([Segment([Checkpoint(parameters)], data)])


@dataclass(frozen=True)
class Settings:
    projection_dim: int = 0  # 0 = exact
    projection_seed: int = 0
    projection_kind: str = "rademacher"
    strategy: str = "ekfac"  # identity | diagonal | kfac | ekfac
    fisher: bool | str = "exact"  # "exact" | True (sampled labels) | "empirical"
    seed: int = 0
    include_bias: bool = True
    batch_size: int | None = None  # None: a whole dataset per forward pass
    dtype: torch.dtype = torch.float64
    modules: tuple[str, ...] | None = None  # names of the tracked nn.Linear modules; None: all
