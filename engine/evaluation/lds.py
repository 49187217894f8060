"""Linear datamodeling score (Park et al. 2023; SOURCE eqs. 7-8).

Ground truth: M subsets of ⌊αN⌋ training examples drawn without replacement, each retrained from
scratch with R seeds; y_j(q) is the seed-mean of query q's loss. A method's group prediction for subset
S_j is G_j(q) = −Σ_{i∈S_j} score(q, i) (scores follow the store: positive = removing i raises the loss,
so the kept set's loss falls with its summed scores). LDS(q) = Spearman(y_·(q), G_·(q)); reported as the
mean over queries with a bootstrap 95% CI (queries resampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import TributaryError
from engine.evaluation.cache import load_or_compute
from engine.evaluation.jobs import retrain_subsets
from engine.evaluation.statistics import spearman, summary


@dataclass(frozen=True)
class GroundTruth:
    masks: np.ndarray  # (M, N) bool
    measurements: np.ndarray  # (M, R, Q)
    reused: bool = False

    @property
    def mean(self) -> np.ndarray:
        return self.measurements.mean(axis=1)  # (M, Q)


def subset_masks(n: int, alpha: float, subsets: int, seed: int) -> np.ndarray:
    size = int(np.floor(alpha * n))
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), bool)
    for j in range(subsets):
        masks[j, rng.choice(n, size, replace=False)] = True
    return masks


def ground_truth(
    task,
    alpha: float = 0.5,
    subsets: int = 50,
    seeds: int = 2,
    seed: int = 0,
    workers: int = 0,
    cache: str | Path | None = None,
) -> GroundTruth:
    """Retrain on M α-subsets × R seeds (Ray tasks when workers > 0), or reuse the cache at `cache`."""
    if not 0 < alpha < 1:
        raise TributaryError(f"alpha {alpha} must lie strictly between 0 and 1 (the kept fraction)")
    if subsets < 2 or seeds < 1:
        raise TributaryError(f"LDS needs at least 2 subsets and 1 seed (got subsets={subsets}, seeds={seeds})")
    n = len(task.train) if hasattr(task, "train") else task.effects.shape[1]
    if int(np.floor(alpha * n)) < 1:
        raise TributaryError(f"alpha {alpha} keeps no example of the {n} training rows; raise alpha")
    key = {
        "job": "lds",
        "task": task.name,
        "fingerprint": task.fingerprint(),
        "alpha": alpha,
        "subsets": subsets,
        "seeds": seeds,
        "seed": seed,
    }

    def compute() -> dict[str, np.ndarray]:
        masks = subset_masks(n, alpha, subsets, seed)
        repeated = np.repeat(masks, seeds, axis=0)
        run_seeds = np.array([1000 * (seed + 1) + j * seeds + r for j in range(subsets) for r in range(seeds)])
        values = retrain_subsets(task, repeated, run_seeds, workers)
        return {"masks": masks, "measurements": values.reshape(subsets, seeds, -1)}

    arrays, reused = load_or_compute(cache, key, compute)
    return GroundTruth(arrays["masks"].astype(bool), arrays["measurements"], reused)


def lds_per_query(scores: np.ndarray, truth: GroundTruth) -> np.ndarray:
    """(Q,) Spearman correlation per query between measured losses and the group predictions."""
    scores = np.asarray(scores, np.float64)
    m, n = truth.masks.shape
    q = truth.measurements.shape[2]
    if scores.shape != (q, n):
        raise TributaryError(f"scores have shape {scores.shape}; the ground truth needs (queries, train) = {(q, n)}")
    predictions = -(truth.masks.astype(np.float64) @ scores.T)  # (M, Q)
    return spearman(truth.mean.T, predictions.T)


def lds(scores: np.ndarray, truth: GroundTruth, resamples: int = 2000) -> dict:
    """Mean LDS over queries with SEM and bootstrap 95% CI."""
    return summary(lds_per_query(scores, truth), resamples)
