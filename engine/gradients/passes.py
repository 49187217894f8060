"""Gradient passes over tokenised rows: pass 1 (projected gradients + covariance sums), per-token gradients of a
query, and pass 2 (Λ sums).

A shard is a contiguous row range; nothing here depends on which shards a worker gets, so any split
of the rows gives the same rows and, after merging, the same statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engine.capture.capture import ForwardPass
from engine.capture.loss import NextTokenLoss, sample_labels
from engine.capture.measurement import measurement_loss
from engine.curvature.accumulators import CovarianceAccumulator, GradientGramAccumulator, LambdaAccumulator, Sketch
from engine.curvature.factors import NEEDS_COVARIANCE, ModuleFactors
from engine.curvature.statistics import ModuleCovariance, PartialSums
from engine.data.batching import Batch, batches
from engine.data.labels import IGNORE
from engine.data.tokenize import TokenizedRow
from engine.gradients.context import ModelContext
from engine.gradients.finite import NonFinite, merged, nonfinite_gradients, nonfinite_statistics
from engine.projection import ProjectionSpec


@dataclass
class ShardGradients:
    start: int
    grads: np.ndarray  # (n, D) in the compute dtype
    losses: np.ndarray
    num_tokens: np.ndarray
    sums: PartialSums
    nonfinite: NonFinite = field(default_factory=dict)  # row position in the shard → non-finite modules
    fisher_grads: np.ndarray | None = None  # (n, D) sampled-label rows (pass 1 with fisher_rows), for Λ
    full_covariance: dict[str, ModuleCovariance] = field(default_factory=dict)  # pass 1 given `full`


def _curvature_labels(context: ModelContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    curvature = context.config.curvature
    if curvature.fisher == "empirical":
        return batch.labels
    return sample_labels(logits, batch.labels, batch.position_ids, batch.indices, curvature.seed)


def _batches(context: ModelContext, rows: list[TokenizedRow]):
    data = context.config.data
    for batch in batches(rows, data.batch_size, context.pad_id, data.padding_side):
        yield batch.to(context.device)


def batch_count(rows: int, batch_size: int) -> int:
    """How many batches `rows` rows make (the last one may be short)."""
    return -(-rows // batch_size)


def padded_batches(
    context: ModelContext, rows: list[TokenizedRow], pad_batches: int | None
) -> Iterator[tuple[Batch, bool]]:
    """(batch, is_padding): the batches of `rows`, then padding batches up to `pad_batches` in all.

    ZeRO-3 ranks all-gather each module's weights in every forward and backward, collectively: the ranks of a
    group must run as many of them, whatever their own row count. A padding batch is one row (the first row
    of `rows`, or a two-token dummy when there is none); its results are discarded.
    """
    yield from ((batch, False) for batch in _batches(context, rows))
    if pad_batches is None:
        return
    own = batch_count(len(rows), context.config.data.batch_size)
    if own > pad_batches:
        raise ValueError(f"pad_batches {pad_batches} is below the {own} batches of the rows themselves")
    filler = rows[:1] or [TokenizedRow(index=0, input_ids=[context.pad_id] * 2, labels=[IGNORE, context.pad_id])]
    for _ in range(pad_batches - own):
        yield next(_batches(context, filler)), True


def gradient_pass(
    context: ModelContext,
    rows: list[TokenizedRow],
    start: int = 0,
    with_covariance: bool = True,
    measurement: str = "logprob_sum",
    pad_batches: int | None = None,
    fisher_rows: bool = False,
    full: ModelContext | None = None,
) -> ShardGradients:
    """Projected per-example gradients of the loss (queries: of `measurement`), and the covariance sums
    for K-FAC/EK-FAC (training rows only). `fisher_rows` (true Fisher only): also the projected gradients of
    the sampled-label loss (`fisher_grads`), from the same backward as the covariance, so that Λ can be
    read from the store instead of running the model a second time. `pad_batches`: run padding batches
    after the rows' own up to that many batches in all, with the same forward/backward calls, results
    discarded (ZeRO-3 lockstep). `full`: the same model captured at full width (exact.factors, one pass for
    both): the hooks and backwards run there, each batch is projected here with `context`'s matrices, and the
    full-width covariance sums of the curvature labels are kept too (`full_covariance`, float64 products)."""
    capture = context.capture
    runner = full or context  # the capture the model runs under
    curvature = context.config.curvature
    want_covariance = with_covariance and curvature.strategy in NEEDS_COVARIANCE
    want_fisher_rows = fisher_rows and curvature.fisher is True
    covariance = CovarianceAccumulator(context.spec)
    full_covariance = CovarianceAccumulator(full.spec) if full is not None and want_covariance else None
    # The shard's outputs go into buffers allocated once, not a small tensor per batch: kept allocations made
    # between a batch's large temporaries pin the allocator's heap, which then grows by the batch (~2 MB a batch
    # of issue 13's workload, about 0.1 GB over a 512-row shard).
    out = _ShardBuffers(len(rows), context.spec.total_width, capture.compute_dtype, want_fisher_rows)
    nonfinite: list[NonFinite] = []
    done = 0
    # ZeRO-3 frees a module's gathered weights after its backward, so a retained graph cannot be walked twice:
    # the curvature-label backward gets a forward of its own there (same logits, same sampled labels).
    reforward = context.config.placement.kind == "zero3"
    with runner.capture.hooks():
        for batch, padding in padded_batches(context, rows, pad_batches):
            state = runner.capture.forward(batch)
            separate_fisher = (want_covariance or want_fisher_rows) and curvature.fisher is True
            retain = separate_fisher and not reforward
            token_loss = NextTokenLoss(state.logits) if measurement == "logprob_sum" else None
            if token_loss is not None:  # the training loss: its logits gradient in closed form
                loss = token_loss.losses(batch.labels)
                logit_gradient = token_loss.logit_gradient(batch.labels)
                deltas = runner.capture.output_gradients_of_logits(state, logit_gradient, retain)
            else:
                loss = measurement_loss(measurement, state.logits, batch.labels)
                deltas = runner.capture.output_gradients(state, loss, retain_graph=retain)
            if padding:
                if separate_fisher:  # the same forward/backward calls as a batch of rows
                    _fisher_deltas(runner, batch, state, reforward, token_loss)
                continue
            full_activations, full_deltas = state.activations, deltas
            if full is not None:
                mask = batch.attention_mask
                state = replace(state, activations=capture.projected_activations(full_activations, mask))
                deltas = capture.projected_deltas(full_deltas, mask)
            rows_here = slice(done, done + len(batch.indices))
            capture.write_example_gradients(state, deltas, out.grads[rows_here])
            out.losses[rows_here] = loss.detach()
            out.tokens[rows_here] = batch.num_tokens
            batch_losses = out.losses[rows_here].numpy()
            nonfinite.append(nonfinite_gradients(out.grads[rows_here].numpy(), batch_losses, context.spec, done))
            if separate_fisher:
                full_deltas = deltas = _fisher_deltas(runner, batch, state, reforward, token_loss)
                if full is not None:
                    deltas = capture.projected_deltas(full_deltas, batch.attention_mask)
            if out.fisher is not None:
                capture.write_example_gradients(state, deltas, out.fisher[rows_here])
                nonfinite.append(nonfinite_gradients(out.fisher[rows_here].numpy(), batch_losses, context.spec, done))
            if want_covariance:
                nonfinite.append(nonfinite_statistics(state.activations, done))
                nonfinite.append(nonfinite_statistics(deltas, done))
                covariance.add(state.activations, deltas, batch.attention_mask, state.routed_tokens)
            if full_covariance is not None:
                full_covariance.add(full_activations, full_deltas, batch.attention_mask, state.routed_tokens)
            done += len(batch.indices)
    sums = PartialSums(covariance=covariance.sums if want_covariance else {})
    full_sums = full_covariance.sums if full_covariance is not None else {}
    if not rows:  # a ZeRO-3 rank with padding only
        return ShardGradients(start, np.zeros((0, context.spec.total_width), np.float32), *_no_rows(), sums)
    return ShardGradients(
        start,
        out.grads.numpy(),
        out.losses.numpy(),
        out.tokens.numpy(),
        sums,
        merged(*nonfinite),
        out.fisher.numpy() if out.fisher is not None else None,
        full_sums,
    )


class _ShardBuffers:
    """A shard's rows, losses, token counts and (true Fisher, Λ from the store) sampled-label rows, on the CPU."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, fisher: bool):
        self.grads = torch.empty((rows, width), dtype=dtype)
        self.losses = torch.empty(rows, dtype=torch.float32)
        self.tokens = torch.empty(rows, dtype=torch.int64)
        self.fisher = torch.empty((rows, width), dtype=dtype) if fisher else None


def _fisher_deltas(
    context: ModelContext,
    batch: Batch,
    state: ForwardPass,
    reforward: bool,
    token_loss: NextTokenLoss | None = None,
) -> dict[str, list[torch.Tensor]]:
    """δ of the loss on curvature labels (the covariance's), from `state`'s graph or, `reforward`, a new forward;
    `token_loss`: the log-softmax of `state`'s logits, already taken."""
    capture = context.capture
    if reforward:
        state = capture.forward(batch)
        token_loss = None
    return _curvature_deltas(context, batch, state, token_loss or NextTokenLoss(state.logits))


def _curvature_deltas(
    context: ModelContext, batch: Batch, state: ForwardPass, token_loss: NextTokenLoss
) -> dict[str, list[torch.Tensor]]:
    """δ of the summed loss on curvature labels (sampled: true Fisher; the data's: empirical), freeing the graph."""
    labels = _curvature_labels(context, batch, state.logits)
    return context.capture.output_gradients_of_logits(state, token_loss.logit_gradient(labels), retain_graph=False)


def covariance_pass(
    context: ModelContext,
    rows: list[TokenizedRow],
    sketch: Sketch | None = None,
    upcast: bool = False,
    pad_batches: int | None = None,
    per_example: bool = False,
) -> tuple[dict[str, ModuleCovariance], NonFinite]:
    """K-FAC covariance sums of `rows` at `context`'s projection, and nothing else: one forward and one backward of
    the curvature labels' loss per batch (the fitted projections' fitting pass, at full width; `sketch`: C Ω in
    place of C where it gives an Ω). Also the rows (positions in `rows`) whose activations or δ̃ are not finite:
    the sums then hold them and must not be used. `upcast`: products in float64, as pass 1's (full-width factors
    that give the scores, not only eigenvectors to project with). `pad_batches`: as in gradient_pass (ZeRO-3
    lockstep). `per_example`: each side's second moment of the per-example gradients in place of the token
    covariances (projection kind grad_pca, `GradientGramAccumulator`)."""
    capture = context.capture
    covariance = (
        GradientGramAccumulator(context.spec, sketch=sketch)
        if per_example
        else CovarianceAccumulator(context.spec, upcast=upcast, sketch=sketch)
    )
    nonfinite: list[NonFinite] = []
    done = 0
    with capture.hooks():
        for batch, padding in padded_batches(context, rows, pad_batches):
            state = capture.forward(batch)
            deltas = _curvature_deltas(context, batch, state, NextTokenLoss(state.logits))
            if padding:
                continue
            nonfinite += [nonfinite_statistics(state.activations, done), nonfinite_statistics(deltas, done)]
            covariance.add(state.activations, deltas, batch.attention_mask, state.routed_tokens)
            done += len(batch.indices)
    return covariance.sums, merged(*nonfinite)


def _no_rows() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.float32), np.zeros(0, np.int64)


def gradient_pass_without(
    context: ModelContext,
    rows: list[TokenizedRow],
    start: int,
    left_out: NonFinite,
    fisher_rows: bool = False,
    full: ModelContext | None = None,
):
    """Pass 1 of the rows not in `left_out` (positions), with the left-out rows' gradients and losses kept as
    zeros in place: the covariance sums are those of the kept rows alone (data.on_nonfinite: skip)."""
    kept = [position for position in range(len(rows)) if position not in left_out]
    kept_rows = [rows[p] for p in kept]
    partial = gradient_pass(context, kept_rows, start, fisher_rows=fisher_rows, full=full) if kept else None
    width = context.spec.total_width
    grads = np.zeros((len(rows), width), dtype=partial.grads.dtype if partial else np.float32)
    fisher = np.zeros_like(grads) if fisher_rows and context.config.curvature.fisher is True else None
    losses = np.zeros(len(rows), dtype=np.float32)
    tokens = np.array([len(row.input_ids) for row in rows], dtype=np.int64)  # as Batch.num_tokens counts
    sums = PartialSums()
    full_sums = {}
    again: NonFinite = {}
    if partial is not None:
        full_sums = partial.full_covariance
        grads[kept], losses[kept], tokens[kept], sums = partial.grads, partial.losses, partial.num_tokens, partial.sums
        again = {kept[position]: names for position, names in partial.nonfinite.items()}
        if fisher is not None and partial.fisher_grads is not None:
            fisher[kept] = partial.fisher_grads
    return ShardGradients(start, grads, losses, tokens, sums, again, fisher, full_sums)


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
    on_nonfinite: Callable[[NonFinite], None] | None = None,
    pad_batches: int | None = None,
    spec: ProjectionSpec | None = None,
) -> PartialSums:
    """Σ_n (Q_Sᵀ G̃_n Q_A)² with curvature labels: EK-FAC's corrected eigenvalues (raw basis: diagonal).
    `scale` multiplies each G̃_n elementwise first (Adam's P^{1/2}: the factors of P^{1/2} H P^{1/2}).
    `on_nonfinite` is called with the rows (positions in `rows`) of a batch whose gradients are not finite,
    before they are added. `pad_batches`: as in gradient_pass (ZeRO-3 lockstep). `spec`: the modules to sum (a
    subset of `context.spec`'s, with `factors` of those alone; engine.exact.partition), default all."""
    capture = context.capture
    lambdas = LambdaAccumulator(spec or context.spec, factors, scale, context.device)
    done = 0
    with capture.hooks():
        for batch, padding in padded_batches(context, rows, pad_batches):
            state = capture.forward(batch)
            deltas = _curvature_deltas(context, batch, state, NextTokenLoss(state.logits))
            if padding:
                continue
            _add_lambdas(lambdas, state.activations, deltas, done, on_nonfinite)
            done += len(batch.indices)
    return PartialSums(lambdas=lambdas.sums)


def _add_lambdas(
    lambdas: LambdaAccumulator,
    activations: dict[str, list[torch.Tensor]],
    deltas: dict[str, list[torch.Tensor]],
    offset: int,
    on_nonfinite: Callable[[NonFinite], None] | None,
) -> None:
    """One batch's Λ sums a module at a time: one module's per-example gradients are held at once, not every
    module's (0.13 GB at full width on issue 13's workload). The first module whose gradients are not finite (a
    rotation keeps finite gradients finite and non-finite ones not) stops the adding; the others are still
    checked, so that `on_nonfinite` (which must raise: the batch is part-added) names every module of each row."""
    found: NonFinite = {}
    for name in lambdas.sums:
        grads, rotated = lambdas.module_token_gradient(name, activations[name], deltas[name])
        if on_nonfinite is not None:
            found = merged(found, nonfinite_statistics({name: [grads]}, offset))
        if not found:
            lambdas.add({name: grads}, rotated=frozenset({name}) if rotated else frozenset())
    if found and on_nonfinite is not None:
        on_nonfinite(found)
        raise RuntimeError("on_nonfinite returned on non-finite gradients: the batch's Λ sums are part-added")
