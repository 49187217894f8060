"""The training loss per example (summed over counted tokens) and labels sampled from the model."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as functional

from engine.data.labels import IGNORE


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T): at position t the label of token t+1, the one position t's logits predict; IGNORE at the last."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


def _loss_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed (not averaged) over each example's counted tokens: shape (B,).

    Every position's logits are scored against the next token's label (`next_token_labels`) rather than the
    logits being sliced to T-1 positions: the slice would cost a copy of the (B, T, V) logits in the forward and
    a zero-filled one in the backward, a large share of a small model's pass."""
    targets = next_token_labels(labels)
    scored = _loss_logits(logits)
    token_loss = functional.cross_entropy(
        scored.reshape(-1, scored.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return token_loss.view(targets.shape).sum(dim=1)


class NextTokenLoss:
    """`per_example_loss` of one forward's logits for any labels, with its gradient with respect to the logits in
    closed form, softmax − one-hot at the counted positions. One log-softmax then serves the data labels and the
    sampled ones, and no backward runs through the loss itself (`GradientCapture.output_gradients_of_logits`)."""

    def __init__(self, logits: torch.Tensor, log_probs: torch.Tensor | None = None):
        """`log_probs`: the log-softmax of these logits where it is already computed (the training loss's), used
        where it is in the dtype this class computes it in."""
        scored = _loss_logits(logits.detach())
        if log_probs is None or log_probs.dtype != scored.dtype:
            with torch.no_grad():
                log_probs = torch.log_softmax(scored, dim=-1)
        self.log_probs = log_probs.detach()
        self.logits_dtype = logits.dtype

    def _targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = next_token_labels(labels)
        counted = targets != IGNORE
        return torch.where(counted, targets, torch.zeros_like(targets)), counted

    def losses(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) summed next-token losses for `labels`."""
        safe, counted = self._targets(labels)
        picked = torch.gather(self.log_probs, -1, safe.unsqueeze(-1)).squeeze(-1)
        return torch.where(counted, -picked, torch.zeros_like(picked)).sum(dim=1)

    def logit_gradient(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, T, V) ∂ Σ_examples loss / ∂ logits for `labels`, in the logits' dtype."""
        safe, counted = self._targets(labels)
        gradient = self.log_probs.exp()
        gradient.scatter_add_(-1, safe.unsqueeze(-1), torch.full_like(safe, -1, dtype=gradient.dtype).unsqueeze(-1))
        gradient.mul_(counted.unsqueeze(-1))
        return gradient.to(self.logits_dtype)


def _uniforms(seed: int, example_index: int, length: int) -> np.ndarray:
    digest = hashlib.sha256(f"tributary-fisher/{seed}/{example_index}".encode()).digest()
    generator = np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))
    return generator.random(length)


@torch.no_grad()
def sample_labels(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, example_indices: list[int], seed: int
) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution at every counted position (true Fisher).

    Each example's draws come from its own counter-based stream keyed by (seed, example index) and
    indexed by token position, so they do not depend on batch composition, padding side or worker.
    The float64 cumulative distribution is built one example at a time: for the whole batch it would be two
    (B, T, V) float64 transients, the largest allocations of a small-vocabulary model's pass, and every
    position's arithmetic is the same either way.
    """
    sampled = torch.full_like(labels, IGNORE)
    counted = labels[:, 1:] != IGNORE
    if not counted.any():
        return sampled
    width = labels.shape[1]
    for row, index in enumerate(example_indices):
        if not counted[row].any():
            continue
        probabilities = torch.softmax(logits[row, :-1].to(torch.float64), dim=-1)
        cumulative = probabilities.cumsum_(dim=-1)  # in place: half the time
        uniforms = torch.from_numpy(_uniforms(seed, index, width + 1)).to(logits.device)
        # the draw for the token at position p+1 uses uniform number p+1 of its example's stream
        per_position = uniforms[position_ids[row, 1:] + 1]
        draws = torch.searchsorted(cumulative, per_position.unsqueeze(-1)).squeeze(-1)
        draws = draws.clamp(max=logits.shape[-1] - 1)
        sampled[row, 1:] = torch.where(counted[row], draws, torch.full_like(draws, IGNORE))
    return sampled
