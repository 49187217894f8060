"""Flatten per-module partial sums into one float64 vector per shard (and back) for the store.

Each shard's sums are kept in the store, one row per shard, so a resumed or re-issued run never
loses statistics, and the driver reduces them in shard order: the factors are then the same for
any number of workers and any assignment of shards to them.
"""

from __future__ import annotations

import numpy as np

from engine.curvature.statistics import ModuleCovariance, ModuleLambda
from engine.projection import ProjectionSpec


def covariance_width(spec: ProjectionSpec) -> int:
    return sum(m.k_in**2 + m.k_out**2 for m in spec.modules)


def lambda_width(spec: ProjectionSpec) -> int:
    return sum(m.k_in * m.k_out for m in spec.modules)


def covariance_counts(spec: ProjectionSpec) -> int:
    """Counts a shard's covariance sums carry: tokens and examples, then each module's own tokens (a routed
    expert's are those routed to it; every other module's equal the first count)."""
    return 2 + len(spec.modules)


def pack_covariance(sums: dict[str, ModuleCovariance], spec: ProjectionSpec) -> tuple[np.ndarray, np.ndarray]:
    vector = np.concatenate(
        [np.concatenate([sums[m.name].a_sum.ravel(), sums[m.name].s_sum.ravel()]) for m in spec.modules]
    )
    first = sums[spec.modules[0].name]
    tokens = [sums[m.name].tokens for m in spec.modules]
    return vector, np.array([max(tokens), first.examples, *tokens], dtype=np.int64)


Shapes = list[tuple[tuple[int, int], tuple[int, int]]]  # per module, the (A, S) sums' shapes


def square_shapes(spec: ProjectionSpec) -> Shapes:
    return [((m.k_in, m.k_in), (m.k_out, m.k_out)) for m in spec.modules]


def shapes_width(shapes: Shapes) -> int:
    return sum(a[0] * a[1] + s[0] * s[1] for a, s in shapes)


def unpack_covariance(
    vector: np.ndarray, counts: np.ndarray, spec: ProjectionSpec, shapes: Shapes | None = None
) -> dict[str, ModuleCovariance]:
    """`shapes` (default k x k per side): those of sketched sums (engine.projection.fitted.fit_shapes); `counts`
    as `pack_covariance` gives them (stores without per-module tokens: every module counts the first)."""
    out, offset = {}, 0
    tokens = counts[2:] if len(counts) == covariance_counts(spec) else [counts[0]] * len(spec.modules)
    for m, (a_shape, s_shape), module_tokens in zip(spec.modules, shapes or square_shapes(spec), tokens):
        a = vector[offset : offset + a_shape[0] * a_shape[1]].reshape(a_shape)
        offset += a.size
        s = vector[offset : offset + s_shape[0] * s_shape[1]].reshape(s_shape)
        offset += s.size
        out[m.name] = ModuleCovariance(a.copy(), s.copy(), int(module_tokens), int(counts[1]))
    return out


def pack_lambda(sums: dict[str, ModuleLambda], spec: ProjectionSpec) -> tuple[np.ndarray, np.ndarray]:
    vector = np.concatenate([sums[m.name].sum.ravel() for m in spec.modules])
    return vector, np.array([sums[spec.modules[0].name].examples], dtype=np.int64)


def unpack_lambda(vector: np.ndarray, counts: np.ndarray, spec: ProjectionSpec) -> dict[str, ModuleLambda]:
    out, offset = {}, 0
    for m in spec.modules:
        width = m.k_in * m.k_out
        out[m.name] = ModuleLambda(vector[offset : offset + width].reshape(m.k_out, m.k_in).copy(), int(counts[0]))
        offset += width
    return out
