"""Curvature-aware projections: each side's matrix from that side's K-FAC covariance, fitted before pass 1.

kfac_eigen keeps the top-k eigenvectors of A (activations) and S (output gradients): G̃ = Q_S,kᵀ G Q_A,k is then
the block of EK-FAC's eigenbasis coordinates where the gradients carry most of their energy (LoGra's PCA
initialisation). eigen_sketch keeps the top r eigenvectors and adds a seeded Gaussian sketch of their
orthogonal complement, orthonormalised and scaled by √((d-r)/(k-r)) so that its inner products are unbiased:
where the complement's curvature is far below the damping, the damped inverse is close to a scalar there, and
a sketch preserves what it contributes. With k equal to the full width both are rotations, so EK-FAC fitted
inside the projected space gives exact EK-FAC's scores.

`fit: sketch` finds the eigenvectors without the d x d covariance: the fitting pass accumulates Y = C Ω for a
seeded orthonormal Ω of width l = 4 x the eigenvectors kept (Σ_t x_t (x_tᵀ Ω): 2ld products per token, ld floats
per shard, instead of d² and d²), and the driver takes the eigenvectors of the Nyström approximation
Y (Ωᵀ Y)⁺ Yᵀ (Tropp, Yurtsever, Udell, Cevher 2017, "Fixed-rank approximation of a positive-semidefinite
matrix from streaming data"). A side where l would not be narrower than d is fitted exactly.

grad_pca is fitted on the training rows themselves (in-sample): each side keeps the top-k eigenvectors of the
per-example gradients' own second moments, Σ_n G_nᵀ G_n (d_in x d_in) and Σ_n G_n G_nᵀ (d_out x d_out), where K-FAC's
A and S are sums over tokens: the directions in which the rows the store will hold differ most, never the
d_in·d_out x d_in·d_out Gram of the flattened rows. The fitting pass forms G_n at full width per example, one
batch at a time (`covariance_pass(per_example=True)`); the rest (sketch, eigenvectors, storage, resume) is
kfac_eigen's. grad_pca_whitened does the same on the K-FAC-whitened gradients after a first sweep for the
whitening (engine.projection.whitened).
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


EIGENVECTOR_KINDS = ("kfac_eigen", "grad_pca", "grad_pca_whitened")  # every column an eigenvector (no sketch)
PER_EXAMPLE_KINDS = ("grad_pca", "grad_pca_whitened")  # fitted on per-example gradient Grams


def _sides(module: ModuleProjection, side: str) -> tuple[int, int]:
    return (module.d_in, module.k_in) if side == "in" else (module.d_out, module.k_out)


def eigenvectors_kept(spec: ProjectionSpec, module: ModuleProjection, side: str) -> int:
    """How many of the side's eigenvectors its matrix keeps (the rest of eigen_sketch's columns are random)."""
    _, k = _sides(module, side)
    if spec.kind in EIGENVECTOR_KINDS:
        return k
    if spec.kind == "eigen_sketch":
        return min(spec.top if spec.top is not None else spec.dim // 2, k)
    raise ValueError(f"projection kind {spec.kind!r} is not fitted")


def fit_width(spec: ProjectionSpec, module: ModuleProjection, side: str) -> int:
    """Columns of the side's fitting statistic: d for the exact covariance, l < d for a Nyström sketch."""
    d, _ = _sides(module, side)
    if spec.fit != "sketch":
        return d
    width = max(4 * eigenvectors_kept(spec, module, side), 8)
    return width if width < d else d


def fit_shapes(spec: ProjectionSpec) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per module, the shapes of the fitting pass's (activation, output-gradient) statistics."""
    return [((m.d_in, fit_width(spec, m, "in")), (m.d_out, fit_width(spec, m, "out"))) for m in spec.modules]


def covariance_shapes(spec: ProjectionSpec) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per module, the shapes of the fit's first sums (stage `projection`): grad_pca_whitened's K-FAC covariances
    are whole (its inverse roots need them, engine.projection.whitened), every other kind's are `fit_shapes`."""
    if spec.kind == "grad_pca_whitened":
        return [((m.d_in, m.d_in), (m.d_out, m.d_out)) for m in spec.modules]
    return fit_shapes(spec)


def sketch_matrix(spec: ProjectionSpec, module: ModuleProjection, side: str) -> np.ndarray | None:
    """Ω (d x l, orthonormal columns, seeded by module and side) for a sketched side; None where it is exact."""
    d, _ = _sides(module, side)
    width = fit_width(spec, module, side)
    if width == d:
        return None
    draw = projection_matrix(spec.seed, module.name, f"{side}/fit-sketch", d, width, "gaussian")
    orthonormal, _ = np.linalg.qr(draw)
    return orthonormal


def sketch_matrices(spec: ProjectionSpec) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
    """module → (Ω_in, Ω_out) of the fitting pass (None for a side fitted exactly)."""
    return {m.name: (sketch_matrix(spec, m, "in"), sketch_matrix(spec, m, "out")) for m in spec.modules}


def nystrom_eigenvectors(sketch: np.ndarray, omega: np.ndarray, count: int) -> np.ndarray:
    """The `count` leading eigenvectors of the Nyström approximation of a PSD C from Y = C Ω (orthonormal Ω),
    signed as `top_eigenvectors` signs them. A small shift ν keeps (Ωᵀ Y)^-1/2 stable when C is near-singular
    on range(Ω); eigh in place of a Cholesky factor tolerates an exactly singular one."""
    y = np.asarray(sketch, dtype=np.float64)
    shift = np.sqrt(y.shape[0]) * np.finfo(np.float64).eps * max(np.linalg.norm(y, 2), np.finfo(np.float64).tiny)
    shifted = y + shift * omega
    core = omega.T @ shifted
    values, vectors = np.linalg.eigh((core + core.T) / 2)
    inverse_root = vectors @ np.diag(1.0 / np.sqrt(np.maximum(values, shift))) @ vectors.T
    left, _, _ = np.linalg.svd(shifted @ inverse_root, full_matrices=False)
    chosen = left[:, :count]
    signs = np.sign(chosen[np.argmax(np.abs(chosen), axis=0), np.arange(chosen.shape[1])])
    return chosen * np.where(signs == 0, 1.0, signs)


def side_matrix(spec: ProjectionSpec, module: ModuleProjection, side: str, statistic: np.ndarray) -> np.ndarray:
    """P for one side from its fitting statistic: the covariance (d x d) or, sketched, Y = C Ω (d x l)."""
    d, k = _sides(module, side)
    expected = (d, fit_width(spec, module, side))
    if statistic.shape != expected:
        raise ValueError(f"{module.name} {side}: fitting statistic is {statistic.shape}, not {expected}")
    kept = eigenvectors_kept(spec, module, side)
    omega = sketch_matrix(spec, module, side)
    basis = top_eigenvectors(statistic, kept) if omega is None else nystrom_eigenvectors(statistic, omega, kept)
    if spec.kind in EIGENVECTOR_KINDS:
        return basis
    return np.hstack([basis, complement_sketch(basis, k - kept, spec.seed, module.name, side)])


def fitted_matrices(
    spec: ProjectionSpec, covariances: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (P_in, P_out) from each module's fitting statistics (`side_matrix`; sums at any positive
    scale)."""
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
