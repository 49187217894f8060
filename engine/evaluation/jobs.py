"""Run many training runs of a task: in this process, or as Ray tasks (one chunk of runs per task).

The runs are cut into the same chunks either way, and each chunk is one vectorised `Trainer.train`, so
Ray and in-process results agree (tests/evaluation/test_evaluation.py). Only measurements travel back, never models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from engine.config import ClusterConfig
from engine.errors import TributaryError
from engine.evaluation.training import Parameters, Recipe, RunSpec, repeat, stack


def run_chunk(
    task, runs: Sequence[RunSpec], recipe: Recipe, record_at: Sequence[int], start: Parameters | None, what: str
) -> np.ndarray:
    """(len(runs), len(record_at), Q) query losses ("loss") or 0/1 correctness ("correct")."""
    trainer = task.trainer()
    if start is None:
        if any(run.init_seed is None for run in runs):
            raise ValueError("runs from scratch need an init_seed")
        initial = stack([task.init(run.init_seed) for run in runs])
    else:
        initial = repeat(start, len(runs))
    measure = task.query_losses if what == "loss" else task.query_correct
    return trainer.train(initial, runs, recipe, record_at, lambda stacked: measure(trainer, stacked))


def _remote_chunk(task, runs, recipe, record_at, start, what):
    torch.set_num_threads(1)
    return run_chunk(task, runs, recipe, record_at, start, what)


def execute(
    task,
    runs: Sequence[RunSpec],
    recipe: Recipe,
    record_at: Sequence[int],
    start: Parameters | None = None,
    what: str = "loss",
    workers: int = 0,
    chunk: int = 64,
    address: str = "local",
) -> np.ndarray:
    """Measurements of every run at every recorded step: (len(runs), len(record_at), Q).

    workers 0: in this process. workers > 0: Ray tasks on the cluster at `address` ("local" starts one on
    loopback with `workers` CPUs), one chunk of runs each."""
    if what not in ("loss", "correct"):
        raise TributaryError(f"measurement {what!r} is unknown; use 'loss' or 'correct'")
    if workers < 0:
        raise TributaryError(f"workers {workers} must be 0 (in process) or a positive number of Ray workers")
    chunks = [list(runs[i : i + chunk]) for i in range(0, len(runs), chunk)]
    if workers == 0:
        return np.concatenate([run_chunk(task, c, recipe, record_at, start, what) for c in chunks])
    import ray

    from engine.distributed.cluster import connect, forwarded_environment

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    connect(ClusterConfig(address=address, local_cpus=workers if address == "local" else None))
    remote = ray.remote(num_cpus=1, runtime_env={"env_vars": forwarded_environment()})(_remote_chunk)
    shared = ray.put(task)
    pending = [remote.remote(shared, c, recipe, list(record_at), start, what) for c in chunks]
    return np.concatenate(ray.get(pending))


def retrain_subsets(task, masks: np.ndarray, seeds: np.ndarray, workers: int = 0, what: str = "loss") -> np.ndarray:
    """Train from scratch on each mask (with its seed for initialisation and batch order): (runs, Q)."""
    if hasattr(task, "measure_subsets"):
        return task.measure_subsets(masks, seeds, workers)
    runs = [RunSpec(seed=int(s), keep=np.asarray(m, bool), init_seed=int(s)) for m, s in zip(masks, seeds)]
    return execute(task, runs, task.recipe, [task.recipe.steps], None, what, workers)[:, 0]
