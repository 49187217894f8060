"""What a caller of in-memory attribution supplies: datasets, the training run's checkpoints and segments,
and the settings (the config's projection and curvature sections, labels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from engine.config import CurvatureConfig, OptimizerConfig, ProjectionConfig

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


# Adam's β2 and ε where the optimizer section leaves them to an optimizer state (none in memory): torch's defaults.
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8


@dataclass
class TrainingRun:
    segments: Sequence[Segment]
    # the index's training_run.optimizer section: sgd (momentum β: η/(1−β)) or adam, with `preconditioned` Source
    # uses P·H, P from the checkpoints' exp_avg_sq; its beta2/eps default to ADAM_BETA2/ADAM_EPS here
    optimizer: OptimizerConfig = OptimizerConfig()
    averaged: bool = False  # Fast-Source: also compute at each segment's averaged parameters

    @classmethod
    def final_only(cls, parameters: Mapping[str, Tensor], data: Dataset) -> TrainingRun:
        return cls([Segment([Checkpoint(parameters)], data)])


@dataclass(frozen=True)
class Settings:
    """The index's own (validated) projection and curvature sections, and what only an in-memory model adds."""

    projection: ProjectionConfig = ProjectionConfig(dim=0)  # dim 0 = exact; a random kind (fitted ones need a store)
    curvature: CurvatureConfig = CurvatureConfig()  # strategy, seed, and fisher where exact_fisher is off
    # the Gauss-Newton matrix summed over the output dimensions with the loss's hessian_root (no label sampling),
    # in place of curvature.fisher's sampled (true) or the data's (empirical) labels
    exact_fisher: bool = True
    include_bias: bool = True
    batch_size: int | None = None  # None: a whole dataset per forward pass
    dtype: torch.dtype = torch.float64
    modules: tuple[str, ...] | None = None  # names of the tracked nn.Linear modules; None: all
