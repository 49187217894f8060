"""Many small training runs at once: plain SGD on per-example weighted losses, vectorised over runs.

Every run of a job (a retraining on a subset, a further-training run with or without an example) is a
`RunSpec`: which examples it may see, the seed of its batch order, the example it down-weights in every
batch (FiMO's leave_out_every_batch), and the seed of its initialisation when it starts from scratch. A
`Recipe` is the task's training schedule (stages of SGD; each stage its examples, steps, learning rate,
batch size). A run's step k is `θ ← θ − η_k ∇ Σ_j w_kj ℓ_j(θ)` with w_k its batch weights over all N
examples, so runs that differ only in their weights share one vectorised forward/backward
(`torch.func.vmap` over stacked parameters).

Batch order (the pairing FiMO relies on): each epoch of a stage draws one permutation of all of the
stage's examples from (seed, stage, epoch), then drops the examples the run does not keep, and cuts the
rest into batches. A run without example i therefore sees the same order minus i (FiMO's
RandomSamplerLOO), and two runs with the same seed and the same kept set see identical batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from engine.attribution.in_memory import Dataset, ExampleLoss

Parameters = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stage:
    steps: int
    learning_rate: float
    batch_size: int | None = None  # None: full batch
    examples: tuple[int, ...] | None = None  # indices of the training set this stage trains on; None: all


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def describe(self) -> list[dict]:
        return [
            {
                "steps": s.steps,
                "learning_rate": s.learning_rate,
                "batch_size": s.batch_size,
                "examples": None if s.examples is None else len(s.examples),
            }
            for s in self.stages
        ]


@dataclass(frozen=True)
class RunSpec:
    seed: int  # batch order
    keep: np.ndarray | None = None  # (N,) bool; None: every example
    down_weight: int = -1  # FiMO leave_out_every_batch: subtract ℓ_i / n_stage in every step
    init_seed: int | None = None  # from scratch: the task's initialisation with this seed


def step_plan(run: RunSpec, recipe: Recipe, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each step's examples and loss weights, padded to one width, and learning rates of `run`:
    (steps, width) indices into the training set, (steps, width) weights, (steps,) rates."""
    keep = np.ones(n, bool) if run.keep is None else np.asarray(run.keep, bool)
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    rates = np.zeros(recipe.steps)
    for index, stage in enumerate(recipe.stages):
        members = np.arange(n) if stage.examples is None else np.asarray(stage.examples, np.int64)
        kept_count = int(keep[members].sum())
        down = run.down_weight if run.down_weight >= 0 and keep[run.down_weight] and run.down_weight in members else -1
        epoch, done = 0, 0
        while done < stage.steps:
            order = np.random.default_rng([run.seed, index, epoch]).permutation(members)
            order = order[keep[order]]
            size = stage.batch_size or max(len(order), 1)
            for start in range(0, max(len(order), 1), size):
                if done == stage.steps:
                    break
                batch = order[start : start + size]
                weights = np.full(len(batch), 1.0 / max(len(batch), 1))
                if down >= 0:  # FiMO: mean batch loss − ℓ_i / n, in every step
                    batch, weights = np.r_[batch, down], np.r_[weights, -1.0 / kept_count]
                rates[len(batches)] = stage.learning_rate
                batches.append((batch, weights))
                done += 1
            epoch += 1
    width = max(max(len(b) for b, _ in batches), 1)
    indices = np.zeros((len(batches), width), np.int64)
    weights = np.zeros((len(batches), width))
    for step, (batch, weight) in enumerate(batches):
        indices[step, : len(batch)] = batch
        weights[step, : len(batch)] = weight
    return indices, weights, rates


def step_weights(run: RunSpec, recipe: Recipe, n: int) -> np.ndarray:
    """(steps, N) dense weights of each step's loss over all training examples."""
    indices, weights, _ = step_plan(run, recipe, n)
    dense = np.zeros((len(indices), n))
    for step in range(len(indices)):
        np.add.at(dense[step], indices[step], weights[step])
    return dense


@dataclass
class Trainer:
    """Trains stacks of runs of one architecture with one per-example loss."""

    model: nn.Module
    loss: ExampleLoss
    data: Dataset
    dtype: torch.dtype = torch.float64
    _forward: Callable = field(init=False, repr=False)
    _batched: Callable = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def one(parameters: Parameters, inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, parameters, (inputs,))

        self._forward = vmap(one, in_dims=(0, None))
        self._batched = vmap(one, in_dims=(0, 0))

    def outputs(self, stacked: Parameters, inputs: torch.Tensor) -> torch.Tensor:
        return self._forward(stacked, inputs.to(self.dtype))

    def losses(self, stacked: Parameters, data: Dataset) -> torch.Tensor:
        """(R, n) per-example losses of every run on `data`."""
        outputs = self.outputs(stacked, data.inputs)
        runs, count = outputs.shape[:2]
        targets = (
            data.targets.unsqueeze(0).expand(runs, *data.targets.shape).reshape(runs * count, *data.targets.shape[1:])
        )
        return self.loss.loss(outputs.reshape(runs * count, *outputs.shape[2:]), targets).reshape(runs, count)

    def train(
        self,
        start: Parameters,
        runs: Sequence[RunSpec],
        recipe: Recipe,
        record_at: Sequence[int],
        measure: Callable[[Parameters], torch.Tensor],
    ) -> np.ndarray:
        """Train every run from `start` (stacked, R leading) and return measure(θ) at each recorded step:
        (R, len(record_at), ...). Step 0 is the start."""
        n = len(self.data)
        plans = [step_plan(run, recipe, n) for run in runs]
        width = max(p[0].shape[1] for p in plans)
        pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731 (padding has weight 0)
        indices = torch.from_numpy(np.stack([pad(p[0]) for p in plans]))  # (R, steps, width)
        weights = torch.from_numpy(np.stack([pad(p[1]) for p in plans])).to(self.dtype)
        rates = torch.from_numpy(np.stack([p[2] for p in plans])).to(self.dtype)  # (R, steps)
        parameters = {name: p.detach().clone().to(self.dtype).requires_grad_(True) for name, p in start.items()}
        wanted = sorted(set(int(s) for s in record_at))
        recorded: dict[int, np.ndarray] = {}
        last = max(wanted) if wanted else 0
        inputs, targets = self.data.inputs.to(self.dtype), self.data.targets
        for step in range(last + 1):
            if step in wanted:
                with torch.no_grad():
                    recorded[step] = measure(parameters).detach().numpy()
            if step == last:
                break
            batch = indices[:, step]  # (R, width)
            outputs = self._batched(parameters, inputs[batch])
            runs_, width_ = batch.shape
            flat_targets = targets[batch.reshape(-1)]
            losses = self.loss.loss(outputs.reshape(runs_ * width_, *outputs.shape[2:]), flat_targets)
            total = (losses.reshape(runs_, width_) * weights[:, step]).sum()
            grads = torch.autograd.grad(total, list(parameters.values()))
            with torch.no_grad():
                for (_name, p), g in zip(parameters.items(), grads):
                    rate = rates[:, step].reshape(-1, *([1] * (p.dim() - 1)))
                    p -= rate * g
        return np.stack([recorded[int(s)] for s in record_at], axis=1)


def stack(parameters: Sequence[Parameters]) -> Parameters:
    return {name: torch.stack([p[name].detach() for p in parameters]) for name in parameters[0]}


def repeat(parameters: Parameters, count: int) -> Parameters:
    return {name: p.detach().unsqueeze(0).expand(count, *p.shape).clone() for name, p in parameters.items()}


def unstack(stacked: Parameters, index: int) -> Parameters:
    return {name: p[index].detach().clone() for name, p in stacked.items()}


__all__ = ["Recipe", "RunSpec", "Stage", "Trainer", "repeat", "stack", "step_plan", "step_weights", "unstack"]
