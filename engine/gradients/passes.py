"""Gradient passes over tokenised rows: pass 1 (projected gradients + covariance sums), per-token gradients of a
query, and pass 2 (Λ sums).

A shard is a contiguous row range; nothing here depends on which shards a worker gets, so any split
of the rows gives the same rows and, after merging, the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.capture.loss import per_example_loss, sample_labels
from engine.capture.measurement import measurement_loss
from engine.curvature.accumulators import CovarianceAccumulator, LambdaAccumulator
from engine.curvature.factors import NEEDS_COVARIANCE, ModuleFactors
from engine.curvature.statistics import PartialSums
from engine.data.batching import Batch, batches
from engine.data.labels import IGNORE
from engine.data.tokenize import TokenizedRow
from engine.gradients.context import ModelContext


@dataclass
class ShardGradients:
    start: int
    grads: np.ndarray  # (n, D) in the compute dtype
    losses: np.ndarray
    num_tokens: np.ndarray
    sums: PartialSums


def _curvature_labels(context: ModelContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    curvature = context.config.curvature
    if curvature.fisher == "empirical":
        return batch.labels
    return sample_labels(logits, batch.labels, batch.position_ids, batch.indices, curvature.seed)


def _batches(context: ModelContext, rows: list[TokenizedRow]):
    data = context.config.data
    for batch in batches(rows, data.batch_size, context.pad_id, data.padding_side):
        yield batch.to(context.device)


def gradient_pass(
    context: ModelContext,
    rows: list[TokenizedRow],
    start: int = 0,
    with_covariance: bool = True,
    measurement: str = "logprob_sum",
) -> ShardGradients:
    """Projected per-example gradients of the loss (queries: of `measurement`), and the covariance sums
    for K-FAC/EK-FAC (training rows only)."""
    capture = context.capture
    curvature = context.config.curvature
    want_covariance = with_covariance and curvature.strategy in NEEDS_COVARIANCE
    covariance = CovarianceAccumulator(context.spec)
    grads, losses, tokens = [], [], []
    with capture.hooks():
        for batch in _batches(context, rows):
            state = capture.forward(batch)
            loss = measurement_loss(measurement, state.logits, batch.labels)
            separate_fisher = want_covariance and curvature.fisher is True
            deltas = capture.output_gradients(state, loss, retain_graph=separate_fisher)
            grads.append(capture.flatten(capture.example_gradients(state, deltas)).detach().cpu())
            losses.append(loss.detach().float().cpu())
            tokens.append(batch.num_tokens.cpu())
            if want_covariance:
                if separate_fisher:
                    sampled = _curvature_labels(context, batch, state.logits)
                    fisher_loss = per_example_loss(state.logits, sampled)
                    deltas = capture.output_gradients(state, fisher_loss, retain_graph=False)
                covariance.add(state.activations, deltas, batch.attention_mask)
    sums = PartialSums(covariance=covariance.sums if want_covariance else {})
    return ShardGradients(start, torch.cat(grads).numpy(), torch.cat(losses).numpy(), torch.cat(tokens).numpy(), sums)


def token_gradients(context: ModelContext, row: TokenizedRow, measurement: str = "logprob_sum") -> np.ndarray:
    """(T, D): for each counted token t of `row`, the projected gradient of token t's own term of
    `measurement` (they sum to the row's gradient for logprob_sum and margin).

    One forward pass and one backward per token: the graph is kept, so the T gradients cost T backwards
    through the tracked part of the model instead of T forward + backward passes.
    """
    capture = context.capture
    batch = next(_batches(context, [row]))
    counted = (batch.labels[0, 1:] != IGNORE).nonzero().flatten() + 1
    out = []
    with capture.hooks():
        state = capture.forward(batch)
        for number, position in enumerate(counted.tolist()):
            labels = torch.full_like(batch.labels, IGNORE)
            labels[0, position] = batch.labels[0, position]
            loss = measurement_loss(measurement, state.logits, labels)
            deltas = capture.output_gradients(state, loss, retain_graph=number < len(counted) - 1)
            out.append(capture.flatten(capture.example_gradients(state, deltas)).detach().cpu())
    return torch.cat(out).numpy()


def lambda_pass(
    context: ModelContext,
    rows: list[TokenizedRow],
    factors: dict[str, ModuleFactors],
    scale: dict[str, np.ndarray] | None = None,
) -> PartialSums:
    """Σ_n (Q_Sᵀ G̃_n Q_A)² with curvature labels: EK-FAC's corrected eigenvalues (raw basis: diagonal).
    `scale` multiplies each G̃_n elementwise first (Adam's P^{1/2}: the factors of P^{1/2} H P^{1/2})."""
    capture = context.capture
    lambdas = LambdaAccumulator(context.spec, factors, scale, context.device)
    with capture.hooks():
        for batch in _batches(context, rows):
            state = capture.forward(batch)
            labels = _curvature_labels(context, batch, state.logits)
            deltas = capture.output_gradients(state, per_example_loss(state.logits, labels), retain_graph=False)
            lambdas.add(capture.example_gradients(state, deltas))
    return PartialSums(lambdas=lambdas.sums)
