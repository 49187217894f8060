"""Scores of a batch of training rows from their per-token captures, without the per-example gradient where
that is cheaper.

For a module, G_i = Σ_t δ_t a_tᵀ and ⟨q', G_i⟩ = Σ_t δ_tᵀ q' a_t. With q' of rank r (U Vᵀ) that is
Σ_t (Uᵀ δ_t) · (Vᵀ a_t): T·r·(d_in + d_out) products per query instead of the T·d_in·d_out of forming G_i,
so the factored form is taken where T·r·(d_in + d_out) < d_in·d_out, and G_i is formed otherwise (a full-rank q'
never wins: r = min(d_in, d_out) makes the left side larger). ‖G_i‖² (grad_cos) is likewise
Σ_{t,s} (δ_t·δ_s)(a_t·a_s) where T·(d_in + d_out) < d_in·d_out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.capture.capture import example_gradient
from engine.exact.queries import ExactQueries


@dataclass
class QuerySide:
    """ExactQueries as tensors on the scoring device, in the capture's dtype."""

    whole: dict[str, torch.Tensor]  # (Q, d_out · d_in)
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (Q, d_out, r), (Q, r, d_in)
    normalise: bool

    @classmethod
    def of(cls, queries: ExactQueries, dtype: torch.dtype, device: torch.device) -> QuerySide:
        def tensor(values) -> torch.Tensor:
            return torch.as_tensor(values).to(dtype=dtype, device=device)

        return cls(
            {name: tensor(q).reshape(q.shape[0], -1) for name, q in queries.whole.items()},
            {name: (tensor(left), tensor(right)) for name, (left, right) in queries.low_rank.items()},
            queries.normalise,
        )


def factored(tokens: int, rank: int, d_in: int, d_out: int) -> bool:
    return tokens * rank * (d_in + d_out) < d_in * d_out


def batch_scores(
    side: QuerySide, activations: dict[str, list[torch.Tensor]], deltas: dict[str, list[torch.Tensor]]
) -> torch.Tensor:
    """(Q, B) scores of one batch's rows, summed over modules in layout order (a fixed order: deterministic)."""
    total: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    for name, whole in side.whole.items():
        acts, dels = activations[name], deltas[name]
        d_in, d_out = acts[0].shape[-1], dels[0].shape[-1]
        tokens = sum(a.shape[1] for a in acts)
        gradient = None
        if name in side.low_rank and factored(tokens, side.low_rank[name][1].shape[1], d_in, d_out):
            left, right = side.low_rank[name]
            part = sum(
                (torch.einsum("btk,qkr->bqtr", d, left) * torch.einsum("btj,qrj->bqtr", a, right)).sum((2, 3))
                for a, d in zip(acts, dels, strict=True)
            )
            scores = torch.as_tensor(part).T
        else:
            gradient = example_gradient(dels, acts).flatten(start_dim=1)  # (B, d_out · d_in)
            scores = whole @ gradient.T
        total = scores if total is None else total + scores
        if side.normalise:
            square = _squared_norms(acts, dels, gradient)
            norms = square if norms is None else norms + square
    if total is None:
        raise ValueError("no tracked modules to score")
    if norms is not None:
        root = norms.sqrt()
        total = total / torch.where(root > 0, root, torch.ones_like(root))[None, :]
    return total


def _squared_norms(acts: list[torch.Tensor], dels: list[torch.Tensor], gradient: torch.Tensor | None) -> torch.Tensor:
    """‖G_i‖² per row: from G_i where it was formed, else from the token Gram matrices where cheaper."""
    if gradient is not None:
        return (gradient * gradient).sum(1)
    a, d = torch.cat(acts, dim=1), torch.cat(dels, dim=1)
    if a.shape[1] * (a.shape[-1] + d.shape[-1]) < a.shape[-1] * d.shape[-1]:
        return ((d @ d.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
    formed = example_gradient(dels, acts).flatten(start_dim=1)
    return (formed * formed).sum(1)
