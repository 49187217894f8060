"""The training loss per example (summed over counted tokens) and labels sampled from the model."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as functional

from engine.data.labels import IGNORE


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed (not averaged) over each example's counted tokens: shape (B,)."""
    shifted_logits = logits[:, :-1]
    shifted_labels = labels[:, 1:]
    if shifted_logits.dtype in (torch.float16, torch.bfloat16):
        shifted_logits = shifted_logits.float()
    token_loss = functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return token_loss.view(shifted_labels.shape).sum(dim=1)


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
    """
    sampled = torch.full_like(labels, IGNORE)
    counted = labels[:, 1:] != IGNORE
    if not counted.any():
        return sampled
    probabilities = torch.softmax(logits[:, :-1].to(torch.float64), dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    width = labels.shape[1]
    uniforms = torch.stack([torch.from_numpy(_uniforms(seed, index, width + 1)) for index in example_indices]).to(
        logits.device
    )
    # the draw for the token at position p+1 uses uniform number p+1 of its example's stream
    per_position = torch.gather(uniforms, 1, position_ids[:, 1:] + 1)
    draws = torch.searchsorted(cumulative, per_position.unsqueeze(-1)).squeeze(-1)
    draws = draws.clamp(max=probabilities.shape[-1] - 1)
    sampled[:, 1:] = torch.where(counted, draws, torch.full_like(draws, IGNORE))
    return sampled
