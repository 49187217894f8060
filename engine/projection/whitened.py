"""projection.kind grad_pca_whitened: streamed PCA of the K-FAC-whitened per-example gradients (issue 30).

Influence is g_qᵀ H⁻¹ g_n. With K-FAC's H ≈ A ⊗ S (A = Σ a aᵀ of the module's inputs, S = Σ δ δᵀ of its output
gradients, both damped) that is ⟨G̃_q, G̃_n⟩ for the whitened gradients G̃ = S^{-1/2} G A^{-1/2}, so the directions a
row's few stored numbers should keep are the principal directions of G̃_n, not of G_n: raw-gradient PCA
(grad_pca) keeps the high-curvature directions that H⁻¹ then divides down.

The fit is two sweeps over the same fit rows (every ⌈N/fit_rows⌉-th row, as for the other fitted kinds):
1. stage `projection`: the fit rows' K-FAC covariances A and S at full width (kfac_eigen's sums, never sketched:
   the inverse square roots need the whole matrices);
2. stage `projection_gram`: Σ_n G̃_nᵀ G̃_n (d_in x d_in) and Σ_n G̃_n G̃_nᵀ (d_out x d_out), where
   G̃_n = Σ_t (S^{-1/2} δ_t)(A^{-1/2} a_t)ᵀ: the tokens are whitened before the per-example product (the capture
   projects them with the symmetric inverse roots as its matrices), so the d x d Gram of the flattened rows is never
   formed. With projection.fit: sketch these two sums are sketched as grad_pca's are.

Each inverse root is (C + λ I)^{-1/2} with λ = 0.1 x the mean eigenvalue of that side's C (= 0.1 tr C / d), the
heuristic damping the influence functions use for Λ; C is the sum, and its scale does not matter, since rescaling
C rescales λ with it and (cC + cλ)^{-1/2} only changes the whitened Grams by a constant.

The store's matrices. With U_in the top-k eigenvectors of Σ G̃ᵀ G̃ (U_out likewise), the whitened gradient's
coordinates in its principal subspace are U_outᵀ S^{-1/2} G A^{-1/2} U_in, i.e. P_in = A^{-1/2} U_in and
P_out = S^{-1/2} U_out in the store's G ↦ P_outᵀ G P_in. The store then fits its own EK-FAC in the projected
space: its K-FAC factor P_inᵀ A P_in, whose inverse seen from the full space is P_in (P_inᵀ A P_in)^{-1} P_inᵀ, which
depends only on the column space of P_in (P ↦ P M for any invertible M leaves it unchanged); so does S's. EK-FAC's
eigenvalue correction Λ and its damping (0.1 x mean Λ), however, are invariant only under rotations: with
P_in = A^{-1/2} U_in at full width, the projected eigen-coordinates are the exact ones divided by √(s_i a_j) (the
damped eigenvalues), Λ with them, and the store's damping would weigh coordinate (i, j) by s_i a_j λ' instead of λ.
The stored P_in is therefore the orthonormal basis of the same column space, Q_in from the QR factorisation of
A^{-1/2} U_in (P_out likewise): the same subspace, and so the same restricted K-FAC, while at k = d it is a rotation
and the store's EK-FAC gives exact EK-FAC's scores. (Which orthonormal basis of the subspace is immaterial: the
store's EK-FAC is invariant under rotations inside it.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.projection.fitted import side_matrix
from engine.projection.projector import ModuleProjection, ProjectionSpec, build_projection

WHITENED_KIND = "grad_pca_whitened"
DAMPING_FRACTION = 0.1  # λ = 0.1 x the mean eigenvalue, as the influence functions damp Λ


def damped_inverse_root(covariance: np.ndarray) -> np.ndarray:
    """(C + λ I)^{-1/2} of a PSD C (symmetric, float64), λ = 0.1 x C's mean eigenvalue (tr C / d); the identity
    for C = 0 (a module no fit token reached)."""
    c = np.asarray(covariance, dtype=np.float64)
    c = (c + c.T) / 2
    damping = DAMPING_FRACTION * np.trace(c) / c.shape[0]
    if damping <= 0:
        return np.eye(c.shape[0])
    values, vectors = np.linalg.eigh(c)
    return (vectors / np.sqrt(np.maximum(values, 0.0) + damping)) @ vectors.T


def whitening_matrices(
    covariances: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A_λ^{-1/2}, S_λ^{-1/2}) from the fit rows' K-FAC covariance sums (A, S)."""
    return {name: (damped_inverse_root(a), damped_inverse_root(s)) for name, (a, s) in covariances.items()}


def whitening_spec(spec: ProjectionSpec, whitening: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ProjectionSpec:
    """A full-width projection whose matrices are the inverse roots: capturing with it gives whitened ã = A^{-1/2} a
    and δ̃ = S^{-1/2} δ (the roots are symmetric), so per-example products of them are the whitened gradients."""
    widest = max(max(m.d_in, m.d_out) for m in spec.modules)
    shapes = [(m.name, m.d_in, m.d_out) for m in spec.modules]
    return build_projection(widest, spec.seed, WHITENED_KIND, shapes).with_matrices(whitening)


def _orthonormal(matrix: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the column space of a full-column-rank matrix, each column signed so that its largest
    entry in magnitude is positive."""
    basis, _ = np.linalg.qr(matrix)
    signs = np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(basis.shape[1])])
    return basis * np.where(signs == 0, 1.0, signs)


def whitened_side(
    spec: ProjectionSpec, module: ModuleProjection, side: str, gram: np.ndarray, inverse_root: np.ndarray
) -> np.ndarray:
    """P for one side: the orthonormal basis of span(C_λ^{-1/2} U), U the top-k eigenvectors of the side's whitened
    Gram (or of its Nyström sketch)."""
    return _orthonormal(inverse_root @ side_matrix(spec, module, side, gram))


def whitened_matrices(
    spec: ProjectionSpec,
    grams: Mapping[str, tuple[np.ndarray, np.ndarray]],
    whitening: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (P_in, P_out) from the whitened Grams' sums and the inverse roots they were whitened with."""
    return {
        m.name: (
            whitened_side(spec, m, "in", grams[m.name][0], whitening[m.name][0]),
            whitened_side(spec, m, "out", grams[m.name][1], whitening[m.name][1]),
        )
        for m in spec.modules
    }
