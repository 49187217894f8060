"""`projection.budget`: a per-row budget of B stored numbers split over the modules by their measured effective
dimension Σ Λ/(Λ+λ), instead of the same k_in x k_out for every module.

Rounding rule: every module gets one number first, then the remaining B - M are split in proportion to the
effective dimensions by largest remainder (ties to the earlier module), so the shares sum to B exactly. Each
module then takes the largest k_in x k_out within its share (k_in ≤ d_in, k_out ≤ d_out; among equal products the
most nearly square, then the smaller k_in), so a row holds at most B numbers: what a share cannot factor (a prime
share above a side's width, or a share above d_in·d_out) is left unused, never moved to another module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def effective_dimension(lam: np.ndarray, damping: float | None) -> float:
    """Σ Λ/(Λ+λ) over a module's eigenvalues; λ defaults to 0.1 x their mean (the query side's default)."""
    values = np.clip(np.asarray(lam, dtype=np.float64).ravel(), 0.0, None)
    damp = 0.1 * float(values.mean()) if damping is None else float(damping)
    if damp <= 0:
        return float(np.count_nonzero(values))
    return float(np.sum(values / (values + damp)))


def shares(budget: int, weights: Sequence[float]) -> list[int]:
    """B split into one share per weight: one each, the rest by largest remainder (see the module's rule)."""
    count = len(weights)
    if count == 0 or budget < count:
        raise ValueError(f"a budget of {budget} numbers cannot give each of {count} modules one number")
    spare = budget - count
    raw = np.asarray(weights, dtype=np.float64)
    raw = np.where(np.isfinite(raw) & (raw > 0), raw, 0.0)
    ideal = spare * (raw / raw.sum()) if raw.sum() > 0 else np.full(count, spare / count)
    floors = np.floor(ideal).astype(int)
    order = sorted(range(count), key=lambda i: (-(ideal[i] - floors[i]), i))
    for i in order[: spare - int(floors.sum())]:
        floors[i] += 1
    return [1 + int(f) for f in floors]


def factor_share(share: int, d_in: int, d_out: int) -> tuple[int, int]:
    """The largest k_in x k_out ≤ share with k_in ≤ d_in and k_out ≤ d_out (most nearly square, then smaller k_in)."""
    best = (0, 0, 0)  # (product, -|k_in - k_out|, -k_in)
    chosen = (1, 1)
    for k_in in range(1, min(d_in, share) + 1):
        k_out = min(d_out, share // k_in)
        key = (k_in * k_out, -abs(k_in - k_out), -k_in)
        if key > best:
            best, chosen = key, (k_in, k_out)
    return chosen


def allocate(
    budget: int, shapes: Sequence[tuple[str, int, int]], effective: Mapping[str, float]
) -> dict[str, tuple[int, int]]:
    """module → (k_in, k_out) for `shapes` ((name, d_in, d_out) in tracking order) and each module's effective
    dimension; Σ k_in·k_out ≤ budget (the module docstring's rounding rule)."""
    missing = [name for name, _, _ in shapes if name not in effective]
    if missing:
        raise ValueError(f"no effective dimension measured for module {missing[0]}")
    split = shares(budget, [effective[name] for name, _, _ in shapes])
    return {name: factor_share(share, d_in, d_out) for (name, d_in, d_out), share in zip(shapes, split)}
