"""One segment's captured rows and curvature sums, accumulated step by step as training runs.

A row seen once in the segment holds its gradient at that step; a row seen several times (several epochs in
one segment) holds the mean of those gradients, with its last step and epoch; a row the segment never saw is
zero with step −1 and contributes nothing there (the training run did not use it in that segment). The
covariance sums count every occurrence, as the empirical Fisher of the segment's steps (the true Fisher: of the
sampled-label backward of each step, whose rows, averaged the same way, are kept apart for Λ).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.capture.training import CapturedBatch
from engine.curvature.accumulators import CovarianceAccumulator
from engine.errors import TributaryError
from engine.projection import ProjectionSpec


class SegmentRows:
    def __init__(
        self, index: int, rows: int, spec: ProjectionSpec, dtype: np.dtype, first_step: int, fisher: bool = False
    ):
        self.index = index
        self.first_step = first_step  # the first optimizer step of the segment (1-based)
        self.sums = np.zeros((rows, spec.total_width), dtype=dtype)
        self.fisher_sums = np.zeros((rows, spec.total_width), dtype=dtype) if fisher else None  # sampled labels
        self.seen = np.zeros(rows, dtype=np.int32)
        self.loss = np.zeros(rows, dtype=np.float64)
        self.num_tokens = np.zeros(rows, dtype=np.int32)
        self.step = np.full(rows, -1, dtype=np.int64)
        self.epoch = np.full(rows, -1, dtype=np.int64)
        self.covariance = CovarianceAccumulator(spec)
        self.rates: list[float] = []  # the learning rate of each of the segment's optimizer steps

    def add(self, batch: CapturedBatch, step: int, epoch: int) -> None:
        if batch.rows is None:
            raise TributaryError(
                "a captured training batch carries no row indices; build batches with "
                "engine.integrations.TrainingRows.collate, or pass them to capture.step(rows)"
            )
        rows = np.asarray(batch.rows, dtype=np.int64)
        if len(rows) != batch.grads.shape[0] or rows.min() < 0 or rows.max() >= len(self.seen):
            raise TributaryError(
                f"a captured batch names rows {rows.tolist()[:4]} for {batch.grads.shape[0]} examples; rows are "
                f"indices 0..{len(self.seen) - 1} of data.train"
            )
        add = _add_at if len(np.unique(rows)) == len(rows) else np.add.at
        add(self.sums, rows, batch.grads.cpu().numpy().astype(self.sums.dtype, copy=False))
        if self.fisher_sums is not None:
            if batch.fisher_grads is None:
                raise TributaryError("a true-Fisher segment got a captured batch without sampled-label rows")
            add(self.fisher_sums, rows, batch.fisher_grads.cpu().numpy().astype(self.sums.dtype, copy=False))
        add(self.seen, rows, 1)
        add(self.loss, rows, batch.losses.detach().cpu().double().numpy())
        self.num_tokens[rows] = batch.num_tokens.cpu().numpy()
        self.step[rows] = step
        self.epoch[rows] = epoch
        self.covariance.add(batch.activations, batch.deltas, batch.mask)

    @property
    def steps(self) -> int:
        return len(self.rates)

    @property
    def mean_rate(self) -> float:
        return float(np.mean(self.rates))

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1

    def grads(self) -> np.ndarray:
        """Each row's mean captured gradient (zeros where unseen)."""
        return self.sums / np.maximum(self.seen, 1)[:, None].astype(self.sums.dtype)

    def lambda_grads(self) -> np.ndarray:
        """The rows Λ is read from: the sampled-label rows with the true Fisher, else the captured rows."""
        if self.fisher_sums is None:
            return self.grads()
        return self.fisher_sums / np.maximum(self.seen, 1)[:, None].astype(self.sums.dtype)

    def losses(self) -> np.ndarray:
        return (self.loss / np.maximum(self.seen, 1)).astype(np.float32)


def _add_at(target: np.ndarray, rows: np.ndarray, values) -> None:
    """np.add.at for distinct `rows`: the same one addition per element, without ufunc.at's per-element loop
    (about 25x slower on a batch's rows)."""
    target[rows] += values


def cut_points(boundaries: list[int] | None, segments: int, total_steps: int | None) -> list[int]:
    """The steps after which a segment ends (the last segment ends with training): `boundaries` as given, or
    `segments` equal parts of `total_steps`."""
    if boundaries is not None:
        return sorted(boundaries)
    if segments <= 1:
        return []
    if total_steps is None:
        raise TributaryError(
            f"training_run.segments {segments} splits the run into equal parts of its steps, but the total is "
            "unknown; give training_run.total_steps or training_run.boundaries"
        )
    return sorted({round(total_steps * k / segments) for k in range(1, segments)} - {0})


def tensor_rows(rows) -> list[int]:
    return [int(r) for r in torch.as_tensor(rows).flatten().tolist()]


def segment_arrays(segment: SegmentRows, names: list[str]) -> dict[str, np.ndarray]:
    """Everything a resumed run needs of the segment in progress, as named arrays (np.savez)."""
    out = {
        "meta": np.array([segment.index, segment.first_step], dtype=np.int64),
        "sums": segment.sums,
        "seen": segment.seen,
        "loss": segment.loss,
        "num_tokens": segment.num_tokens,
        "step": segment.step,
        "epoch": segment.epoch,
        "rates": np.asarray(segment.rates, dtype=np.float64),
    }
    if segment.fisher_sums is not None:
        out["fisher_sums"] = segment.fisher_sums
    for position, name in enumerate(names):
        covariance = segment.covariance.sums[name]
        out[f"a{position}"] = covariance.a_sum
        out[f"s{position}"] = covariance.s_sum
        out[f"n{position}"] = np.array([covariance.tokens, covariance.examples], dtype=np.int64)
    return out


def restore_segment(segment: SegmentRows, arrays, names: list[str]) -> None:
    """Load `segment_arrays` into a fresh segment of the same rows and projection."""
    segment.index, segment.first_step = (int(v) for v in arrays["meta"])
    for field in ("sums", "seen", "loss", "num_tokens", "step", "epoch"):
        getattr(segment, field)[...] = arrays[field]
    segment.rates = [float(r) for r in arrays["rates"]]
    if segment.fisher_sums is not None:
        segment.fisher_sums[...] = arrays["fisher_sums"]
    for position, name in enumerate(names):
        covariance = segment.covariance.sums[name]
        covariance.a_sum[...] = arrays[f"a{position}"]
        covariance.s_sum[...] = arrays[f"s{position}"]
        covariance.tokens, covariance.examples = (int(v) for v in arrays[f"n{position}"])


def reduce_over_ranks(segment: SegmentRows) -> None:
    """Sum a segment's rows and sums over the ranks of a torch.distributed group (DDP: each rank captured the
    examples of its own micro-batches), so that every rank holds what one process of all the steps would."""
    import torch.distributed as dist

    def reduce(values: np.ndarray, op) -> None:
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        dist.all_reduce(tensor, op=op)
        values[...] = tensor.numpy()

    for values in (segment.sums, segment.seen, segment.loss):
        reduce(values, dist.ReduceOp.SUM)
    if segment.fisher_sums is not None:
        reduce(segment.fisher_sums, dist.ReduceOp.SUM)
    for values in (segment.num_tokens, segment.step, segment.epoch):
        reduce(values, dist.ReduceOp.MAX)  # −1 / 0 where a rank did not see the row
    for covariance in segment.covariance.sums.values():
        reduce(covariance.a_sum, dist.ReduceOp.SUM)
        reduce(covariance.s_sum, dist.ReduceOp.SUM)
        counts = np.array([covariance.tokens, covariance.examples], dtype=np.int64)
        reduce(counts, dist.ReduceOp.SUM)
        covariance.tokens, covariance.examples = (int(v) for v in counts)
