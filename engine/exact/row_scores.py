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


Captures = tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]  # one batch's (a, δ) per module

# A block of batches is scored together so that each module's queries, (Q, d_out · d_in), are read once per block
# and not once per batch: that product is memory-bound (Q·d numbers read for B·d formed), and on issue 13's
# workload, at 8 rows a batch, it took nearly as long as forming the gradients. A block ends once the captures it holds, or its
# largest module's formed gradients, reach these sizes (at least one batch: a batch is never split).
BLOCK_CAPTURE_BYTES = 256 * 2**20
BLOCK_GRADIENT_BYTES = 64 * 2**20


class ScoringBlock:
    """Batches' captures held until the block is full; `scores()` then empties it."""

    def __init__(self, side: QuerySide):
        self.side = side
        self.batches: list[Captures] = []
        self.rows = 0
        self._capture_bytes = 0
        largest = max((w.shape[1] for w in side.whole.values()), default=0)
        self._row_gradient_bytes = largest * next(iter(side.whole.values())).element_size() if side.whole else 0

    def add(self, activations: dict[str, list[torch.Tensor]], deltas: dict[str, list[torch.Tensor]]) -> None:
        self.batches.append((activations, deltas))
        self.rows += _rows(activations)
        self._capture_bytes += sum(t.nbytes for calls in (*activations.values(), *deltas.values()) for t in calls)

    def full(self) -> bool:
        gradients = self.rows * self._row_gradient_bytes
        return self._capture_bytes >= BLOCK_CAPTURE_BYTES or gradients >= BLOCK_GRADIENT_BYTES

    def scores(self) -> torch.Tensor:
        """(Q, rows) of the held batches, in the order added; the block is empty after."""
        scores = block_scores(self.side, self.batches)
        self.batches, self.rows, self._capture_bytes = [], 0, 0
        return scores


def _rows(activations: dict[str, list[torch.Tensor]]) -> int:
    return next(iter(activations.values()))[0].shape[0]


def block_scores(side: QuerySide, batches: list[Captures]) -> torch.Tensor:
    """(Q, ΣB) scores of the batches' rows, in order, summed over modules in layout order (a fixed order:
    deterministic). A module's formed gradients are stacked over the block and met by its queries in one product."""
    total: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    for name, whole in side.whole.items():
        calls = [(activations[name], deltas[name]) for activations, deltas in batches]
        low_rank = side.low_rank.get(name)
        takes_factored = [
            low_rank is not None and _factored_batch(acts, dels, low_rank[1].shape[1]) for acts, dels in calls
        ]
        # the formed batches' gradients go straight into one block buffer (B_formed, d_out · d_in)
        sizes = [acts[0].shape[0] for (acts, _), f in zip(calls, takes_factored) if not f]
        stacked = whole.new_empty((sum(sizes), whole.shape[1]))
        parts: list[torch.Tensor | None] = []  # None: a formed batch, scored by the block's one product below
        squares: list[torch.Tensor] = []
        row = 0
        for (acts, dels), is_factored in zip(calls, takes_factored):
            gradient = None
            if is_factored:
                assert low_rank is not None
                left, right = low_rank
                part = sum(
                    (torch.einsum("btk,qkr->bqtr", d, left) * torch.einsum("btj,qrj->bqtr", a, right)).sum((2, 3))
                    for a, d in zip(acts, dels, strict=True)
                )
                parts.append(torch.as_tensor(part).T)
            else:
                count = acts[0].shape[0]
                gradient = stacked[row : row + count]
                _example_gradient_into(gradient.view(count, dels[0].shape[-1], acts[0].shape[-1]), acts, dels)
                row += count
                parts.append(None)
            if side.normalise:
                squares.append(_squared_norms(acts, dels, gradient))
        products = iter((whole @ stacked.T).split(sizes, dim=1) if sizes else [])
        scores = torch.cat([next(products) if part is None else part for part in parts], dim=1)
        total = scores if total is None else total + scores
        if side.normalise:
            square = torch.cat(squares)
            norms = square if norms is None else norms + square
    if total is None:
        raise ValueError("no tracked modules to score")
    if norms is not None:
        root = norms.sqrt()
        total = total / torch.where(root > 0, root, torch.ones_like(root))[None, :]
    return total


def _factored_batch(acts: list[torch.Tensor], dels: list[torch.Tensor], rank: int) -> bool:
    return factored(sum(a.shape[1] for a in acts), rank, acts[0].shape[-1], dels[0].shape[-1])


def _example_gradient_into(out: torch.Tensor, acts: list[torch.Tensor], dels: list[torch.Tensor]) -> None:
    """Σ_calls Σ_t δ_t a_tᵀ (B, d_out, d_in) written into `out`, a view of the block's buffer (no copy after)."""
    torch.bmm(dels[0].transpose(1, 2), acts[0], out=out)
    for a, d in zip(acts[1:], dels[1:], strict=True):
        out.baddbmm_(d.transpose(1, 2), a)


def _squared_norms(acts: list[torch.Tensor], dels: list[torch.Tensor], gradient: torch.Tensor | None) -> torch.Tensor:
    """‖G_i‖² per row: from G_i where it was formed, else from the token Gram matrices where cheaper."""
    if gradient is not None:
        return (gradient * gradient).sum(1)
    a, d = torch.cat(acts, dim=1), torch.cat(dels, dim=1)
    if a.shape[1] * (a.shape[-1] + d.shape[-1]) < a.shape[-1] * d.shape[-1]:
        return ((d @ d.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
    formed = example_gradient(dels, acts).flatten(start_dim=1)
    return (formed * formed).sum(1)
