"""Per-query agreement statistics and their confidence intervals (numpy only)."""

from __future__ import annotations

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=-1)
    out = np.empty_like(values)
    for index in np.ndindex(values.shape[:-1]):
        row, row_order = sorted_values[index], order[index]
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        ends = np.r_[starts[1:], len(row)]
        average = (starts + ends - 1) / 2.0
        out[index][row_order] = np.repeat(average, ends - starts)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; 0 where either side is constant."""
    a = np.asarray(a, np.float64) - np.mean(a, axis=-1, keepdims=True)
    b = np.asarray(b, np.float64) - np.mean(b, axis=-1, keepdims=True)
    norm = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.where(norm > 0, (a * b).sum(-1) / np.where(norm > 0, norm, 1.0), 0.0)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ along the last axis (Pearson of average ranks)."""
    return pearson(ranks(a), ranks(b))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis; 0 where either side is zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(norm > 0, (a * b).sum(-1) / np.where(norm > 0, norm, 1.0), 0.0)


def bootstrap_ci(values: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-query values (queries resampled with replacement)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def summary(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean, standard error and bootstrap 95% CI of per-query values."""
    values = np.asarray(values, np.float64)
    low, high = bootstrap_ci(values, resamples, seed=seed)
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "sem": sem, "ci95": [low, high], "queries": int(len(values))}
