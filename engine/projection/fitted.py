"""Curvature-aware projections: each side's matrix from that side's K-FAC covariance, fitted before pass 1.

kfac_eigen keeps the top-k eigenvectors of A (activations) and S (output gradients): G̃ = Q_S,kᵀ G Q_A,k is then
the block of EK-FAC's eigenbasis coordinates where the gradients carry most of their energy (LoGra's PCA
initialisation). eigen_sketch keeps the top r eigenvectors and adds a seeded Gaussian sketch of their
orthogonal complement, orthonormalised and scaled by √((d-r)/(k-r)) so that its inner products are unbiased:
where the complement's curvature is far below the damping, the damped inverse is close to a scalar there, and
a sketch preserves what it contributes. With k equal to the full width both are rotations, so EK-FAC fitted
inside the projected space gives exact EK-FAC's scores.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.projection.projector import ModuleProjection, ProjectionSpec, build_projection, projection_matrix


def top_eigenvectors(covariance: np.ndarray, count: int) -> np.ndarray:
    """The `count` eigenvectors of the largest eigenvalues (largest first), each signed so that its largest
    entry in magnitude is positive (eigh's signs are arbitrary)."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    order = np.argsort(-values, kind="stable")[:count]
    chosen = vectors[:, order]
    signs = np.sign(chosen[np.argmax(np.abs(chosen), axis=0), np.arange(chosen.shape[1])])
    return chosen * np.where(signs == 0, 1.0, signs)


def complement_sketch(basis: np.ndarray, count: int, seed: int, module: str, side: str) -> np.ndarray:
    """`count` orthogonal columns spanning a seeded random subspace of the complement of `basis` (orthonormal
    columns), each of norm √((d-r)/count), so that E[C Cᵀ] = I - U Uᵀ."""
    d, r = basis.shape
    if count == 0:
        return np.zeros((d, 0))
    draw = projection_matrix(seed, module, side, d, count, "gaussian")
    inside = draw - basis @ (basis.T @ draw)
    orthonormal, _ = np.linalg.qr(inside)
    return orthonormal * np.sqrt((d - r) / count)


def side_matrix(spec: ProjectionSpec, module: ModuleProjection, side: str, covariance: np.ndarray) -> np.ndarray:
    d, k = (module.d_in, module.k_in) if side == "in" else (module.d_out, module.k_out)
    if covariance.shape != (d, d):
        raise ValueError(f"{module.name} {side}: covariance is {covariance.shape}, not {(d, d)}")
    if spec.kind == "kfac_eigen":
        return top_eigenvectors(covariance, k)
    if spec.kind == "eigen_sketch":
        kept = min(spec.top if spec.top is not None else spec.dim // 2, k)
        basis = top_eigenvectors(covariance, kept)
        return np.hstack([basis, complement_sketch(basis, k - kept, spec.seed, module.name, side)])
    raise ValueError(f"projection kind {spec.kind!r} is not fitted")


def fitted_matrices(
    spec: ProjectionSpec, covariances: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (P_in, P_out) from each module's full-width (A, S) covariance sums (any positive scale)."""
    return {
        m.name: (
            side_matrix(spec, m, "in", covariances[m.name][0]),
            side_matrix(spec, m, "out", covariances[m.name][1]),
        )
        for m in spec.modules
    }


def fit_row_positions(rows: int, fit_rows: int | None, start: int, stop: int) -> list[int]:
    """Positions in the shard [start, stop) of the rows the fit uses: every ⌈rows/fit_rows⌉-th row of the
    dataset (all rows without fit_rows), so every shard contributes and no worker decides."""
    stride = 1 if fit_rows is None or fit_rows >= rows else -(-rows // fit_rows)
    first = -(-start // stride) * stride
    return [row - start for row in range(first, stop, stride)]


def fit_shards(shards: list[tuple[int, int]], rows: int, fit_rows: int | None) -> list[int]:
    """The shards holding at least one fit row."""
    return [i for i, (start, stop) in enumerate(shards) if fit_row_positions(rows, fit_rows, start, stop)]


def full_width(spec: ProjectionSpec) -> ProjectionSpec:
    """The identity projection of the same modules: the fitting pass's covariances are at full width."""
    return build_projection(0, spec.seed, "rademacher", [(m.name, m.d_in, m.d_out) for m in spec.modules])
