"""FiMO's further-training gold standard (Wei et al.; papers/NOTES.md §1.2).

From the final model θ^f, train further on D and on D∖{i} for each left-out example i, with paired
randomness (the same seed: the same batch order minus i, or — `every_batch` — the very same batches with
ℓ_i/n subtracted in every step). Per seed the sensitivity is s_i(q) = loss_q(θ_{−i}) − loss_q(θ_D); the
gold standard is its mean over S seeds, optionally mean-adjusted over the left-out set (FiMO eq. 13:
subtract the mean over i, which removes what all removals share). Positive = removing i raises q's loss,
the sign of the store's scores, so methods compare directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import TributaryError
from engine.evaluation.jobs import execute
from engine.evaluation.statistics import cosine, spearman
from engine.evaluation.training import Parameters, Recipe, RunSpec, Stage

MODES = ("remove", "every_batch")
UNPAIRED_OFFSET = 1_000_003  # an unpaired removal run draws its batch order from another seed


@dataclass(frozen=True)
class GoldStandard:
    steps: tuple[int, ...]
    left_out: np.ndarray  # (L,) training indices
    sensitivities: np.ndarray  # (S, T, Q, L): per seed, loss without i − loss with everything

    def values(self, mean_adjust: bool = True) -> np.ndarray:
        """(T, Q, L) seed-averaged gold standard."""
        mean = self.sensitivities.mean(axis=0)
        return mean - mean.mean(axis=2, keepdims=True) if mean_adjust else mean

    def seed_variance(self) -> np.ndarray:
        """(T,) mean over queries and left-out examples of the variance of s_i(q) across seeds."""
        if self.sensitivities.shape[0] < 2:
            raise TributaryError("the seed variance needs at least 2 seeds")
        return self.sensitivities.var(axis=0, ddof=1).mean(axis=(1, 2))


def further_recipe(steps: int, learning_rate: float, batch_size: int | None) -> Recipe:
    return Recipe((Stage(steps, learning_rate, batch_size),))


def gold_standard(
    task,
    final: Parameters,
    left_out: Sequence[int] | np.ndarray,
    recipe: Recipe,
    record_at: Sequence[int],
    seeds: int = 4,
    mode: str = "remove",
    paired: bool = True,
    seed: int = 0,
    workers: int = 0,
) -> GoldStandard:
    """Further-train from `final` with `recipe` (one stage, typically 1/10 of the original learning rate),
    measuring at each step of `record_at`; S = `seeds` seeds."""
    if mode not in MODES:
        raise TributaryError(f"gold standard mode {mode!r} is unknown; use {' or '.join(MODES)}")
    n = len(task.train)
    left_out = np.asarray(left_out, np.int64)
    if len(left_out) == 0 or left_out.min() < 0 or left_out.max() >= n or len(set(left_out.tolist())) != len(left_out):
        raise TributaryError(f"left-out examples must be distinct indices in [0, {n}) (got {left_out.tolist()[:8]})")
    if seeds < 1 or not record_at or min(record_at) < 1 or max(record_at) > recipe.steps:
        raise TributaryError(
            f"need seeds >= 1 and recorded steps within 1..{recipe.steps} (got seeds={seeds}, "
            f"steps={list(record_at)[:8]})"
        )
    runs = []
    for s in range(seeds):
        base = 10_000 * (seed + 1) + s
        runs.append(RunSpec(seed=base))
        for position, i in enumerate(left_out):
            order = base if paired else base + UNPAIRED_OFFSET * (position + 1)
            if mode == "remove":
                keep = np.ones(n, bool)
                keep[i] = False
                runs.append(RunSpec(seed=order, keep=keep))
            else:
                runs.append(RunSpec(seed=order, down_weight=int(i)))
    values = execute(task, runs, recipe, list(record_at), final, "loss", workers)  # (S·(L+1), T, Q)
    values = values.reshape(seeds, len(left_out) + 1, len(record_at), -1)
    sensitivities = values[:, 1:] - values[:, :1]  # (S, L, T, Q)
    return GoldStandard(tuple(int(t) for t in record_at), left_out, sensitivities.transpose(0, 2, 3, 1))


def agreement(
    scores: np.ndarray | None,
    gold: GoldStandard,
    metric: str = "cosine",
    mean_adjust: bool = True,
    per_step_scores: Sequence[np.ndarray] | None = None,
) -> dict:
    """Per step: mean and SEM over queries of cosine (or Spearman) between a method's scores on the
    left-out examples and the gold standard. `per_step_scores` gives a method whose scores depend on the
    amount of further training (Source with K = that step) one (Q, N) matrix per recorded step."""
    function = {"cosine": cosine, "spearman": spearman}.get(metric)
    if function is None:
        raise TributaryError(f"agreement metric {metric!r} is unknown; use cosine or spearman")
    if scores is None and per_step_scores is None:
        raise TributaryError("agreement needs a method's scores or its per-step scores; both are None")
    truth = gold.values(mean_adjust)
    means, sems = [], []
    for t in range(len(gold.steps)):
        matrix = per_step_scores[t] if per_step_scores is not None else scores
        picked = np.asarray(matrix)[:, gold.left_out]
        if mean_adjust:
            picked = picked - picked.mean(axis=1, keepdims=True)
        values = function(picked, truth[t])
        means.append(float(values.mean()))
        sems.append(float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0)
    return {"steps": list(gold.steps), "mean": means, "sem": sems}
