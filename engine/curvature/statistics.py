"""Mergeable partial sums (sum + count) for the curvature factors.

Any split of the data into parts, reduced with `merge`, gives the same factors as one pass: the
sums are accumulated in float64, so splits differ only by float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ModuleCovariance:
    """Σ_tokens ã ãᵀ over tokens and Σ_tokens δ̃ δ̃ᵀ (sampled-label δ) with their counts."""

    a_sum: np.ndarray
    s_sum: np.ndarray
    tokens: int = 0
    examples: int = 0

    @classmethod
    def zeros(cls, k_in: int, k_out: int, l_in: int | None = None, l_out: int | None = None) -> ModuleCovariance:
        """Sums of k x k (or, sketched, k x l) per side."""
        return cls(
            np.zeros((k_in, k_in if l_in is None else l_in)), np.zeros((k_out, k_out if l_out is None else l_out))
        )

    def merge(self, other: ModuleCovariance) -> ModuleCovariance:
        return ModuleCovariance(
            self.a_sum + other.a_sum,
            self.s_sum + other.s_sum,
            self.tokens + other.tokens,
            self.examples + other.examples,
        )


@dataclass
class ModuleLambda:
    """Σ_examples (Q_Sᵀ G̃ Q_A)² — the corrected eigenvalues before dividing by the count."""

    sum: np.ndarray
    examples: int = 0

    @classmethod
    def zeros(cls, k_in: int, k_out: int) -> ModuleLambda:
        return cls(np.zeros((k_out, k_in)))

    def merge(self, other: ModuleLambda) -> ModuleLambda:
        return ModuleLambda(self.sum + other.sum, self.examples + other.examples)


@dataclass
class PartialSums:
    """One worker's (or one pass's) statistics for every tracked module."""

    covariance: dict[str, ModuleCovariance] = field(default_factory=dict)
    lambdas: dict[str, ModuleLambda] = field(default_factory=dict)

    def merge(self, other: PartialSums) -> PartialSums:
        def join(mine: dict, theirs: dict) -> dict:
            keys = list(mine) + [k for k in theirs if k not in mine]
            return {
                k: mine[k].merge(theirs[k]) if k in mine and k in theirs else mine.get(k, theirs.get(k)) for k in keys
            }

        return PartialSums(join(self.covariance, other.covariance), join(self.lambdas, other.lambdas))


def merge_all(parts: list[PartialSums]) -> PartialSums:
    total = PartialSums()
    for part in parts:
        total = total.merge(part)
    return total


def _gram(tensor: torch.Tensor, upcast: bool, sketch: torch.Tensor | None = None) -> np.ndarray:
    """Σ_tokens x xᵀ of (B, T, k) as float64 — or, with a `sketch` Ω (k x l), Σ_tokens x (xᵀ Ω), 2kl products a
    token instead of k²: the product in float64 (`upcast`), or in the tensor's own dtype when that is at least
    float32, then summed in float64 (half the time on CPU for float32 models)."""
    compute = torch.float64 if upcast else torch.promote_types(tensor.dtype, torch.float32)
    flat = tensor.to(compute).reshape(-1, tensor.shape[-1])
    right = flat if sketch is None else flat @ sketch.to(device=flat.device, dtype=compute)
    return (flat.T @ right).to(torch.float64).cpu().numpy()


def add_covariance(
    target: ModuleCovariance,
    activations: list[torch.Tensor],
    deltas: list[torch.Tensor],
    mask: torch.Tensor,
    upcast: bool = True,
    sketch: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    tokens: int | None = None,
) -> None:
    """Accumulate one batch: activations (B,T,k_in) and sampled-label δ̃ (B,T,k_out) per module call; `upcast`
    False keeps a float32 model's products in float32 (`_gram`); `sketch` (Ω_in, Ω_out) sums C Ω in place of
    C on a side where it is given (the fitting pass's Nyström sketch); `tokens`: the tokens the module saw (a
    routed expert's; its ã is zeros elsewhere), by default every counted token of `mask`."""
    for act in activations:
        target.a_sum += _gram(act, upcast, sketch[0])
    for delta in deltas:
        target.s_sum += _gram(delta, upcast, sketch[1])
    target.tokens += int(mask.sum()) if tokens is None else tokens
    target.examples += int(mask.shape[0])


def add_gradient_gram(
    target: ModuleCovariance,
    grads: torch.Tensor,
    mask: torch.Tensor,
    sketch: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> None:
    """Accumulate one batch of per-example gradients G_n (B, d_out, d_in) as the two sides' second moments:
    Σ_n G_nᵀ G_n into a_sum and Σ_n G_n G_nᵀ into s_sum (projection kind grad_pca), each times Ω where `sketch`
    gives one; products in float32 (they only choose eigenvectors), summed in float64."""
    target.a_sum += _gram(grads, False, sketch[0])
    target.s_sum += _gram(grads.transpose(1, 2), False, sketch[1])
    target.tokens += int(mask.sum())
    target.examples += int(mask.shape[0])


def add_lambda(
    target: ModuleLambda,
    grads: torch.Tensor,
    basis: tuple[torch.Tensor, torch.Tensor] | None,
    scale: torch.Tensor | None = None,
    count: bool = True,
) -> None:
    """Accumulate Σ_n (Q_Sᵀ (s ⊙ G̃_n) Q_A)² for per-example gradients (B, k_out, k_in).

    `basis` = (Q_S, Q_A), or None for the raw basis (diagonal); `scale` an elementwise (k_out, k_in)
    factor (Adam's P^{1/2}, for the factors of P^{1/2} H P^{1/2}); `count` False adds a further label
    draw of the same examples (an exact Fisher sums over the output dimensions).
    """
    # Gradients narrower than float64 are rotated in float32 and their squares summed in float64: the rotation is
    # the cost (d_out²·d_in + d_out·d_in² per example; at projection dim 0 several times a forward+backward),
    # and Λ is an estimate whose float32 rounding (~1e-7 relative) is far below its sampling noise.
    work = torch.float64 if grads.dtype == torch.float64 else torch.float32
    grads = grads.detach().to(work)
    if scale is not None:
        grads = grads * scale.to(work)
    if basis is not None:
        q_s, q_a = basis
        grads = q_s.T.to(work) @ grads @ q_a.to(work)
    target.sum += grads.square().sum(dim=0, dtype=torch.float64).cpu().numpy()
    if count:
        target.examples += grads.shape[0]
