"""Which rows of a pass hold NaN or inf, and in which tracked modules: a store never keeps a non-finite value.

A row is non-finite when its projected gradient (any module's part), its loss, or what it adds to a module's
curvature sums (its activations or curvature δ̃) is NaN or inf. The checks run as the values are computed, so
the error names the row and modules before anything of its shard is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.errors import TributaryError
from engine.projection import ProjectionSpec

LOSS = "loss"
NonFinite = dict[int, list[str]]  # row position in the pass → modules (or "loss") whose part is non-finite


def _mark(found: NonFinite, rows: np.ndarray, name: str) -> None:
    for row in rows.tolist():
        names = found.setdefault(int(row), [])
        if name not in names:
            names.append(name)


def nonfinite_gradients(grads: np.ndarray, losses: np.ndarray, spec: ProjectionSpec, offset: int = 0) -> NonFinite:
    """Rows (offset + position) of flattened gradients (n, D) or losses (n,) that are not finite, per module."""
    found: NonFinite = {}
    for m in spec.modules:
        part = np.asarray(grads[:, m.offset : m.offset + m.width])
        _mark(found, np.flatnonzero(~np.isfinite(part).all(axis=1)) + offset, m.name)
    _mark(found, np.flatnonzero(~np.isfinite(np.asarray(losses, dtype=np.float64))) + offset, LOSS)
    return found


def _sum_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32  # half sums overflow at 65504


def nonfinite_statistics(tensors: dict[str, list[torch.Tensor]], offset: int = 0) -> NonFinite:
    """Rows whose per-example tensors (B, ...) per module call — activations or δ̃ — are not finite."""
    found: NonFinite = {}
    flat = [(name, tensor.detach()) for name, calls in tensors.items() for tensor in calls]
    if not flat:
        return found
    # A sum is finite only if every term is, so one reduction per tensor and one device sync clear the usual
    # batch; isfinite's four elementwise passes then run only on the tensors whose sum is not (or overflowed).
    totals = torch.stack([tensor.sum(dtype=_sum_dtype(tensor)) for _, tensor in flat])
    suspects = (~torch.isfinite(totals)).nonzero().flatten().cpu().tolist()
    for index in suspects:
        name, tensor = flat[index]
        bad = ~torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1)
        _mark(found, bad.nonzero().flatten().cpu().numpy() + offset, name)
    return found


def merged(*parts: NonFinite) -> NonFinite:
    out: NonFinite = {}
    for part in parts:
        for row, names in part.items():
            for name in names:
                _mark(out, np.array([row]), name)
    return dict(sorted(out.items()))


def describe_rows(found: NonFinite, ids: Sequence[str], start: int = 0, shown: int = 3) -> str:
    """'row 4 (id "t4": model.layers.0.mlp.up_proj, loss), …' for the first `shown` rows (positions in `ids`)."""
    parts = [f'row {start + row} (id "{ids[row]}": {", ".join(names)})' for row, names in list(found.items())[:shown]]
    more = len(found) - shown
    return "; ".join(parts) + (f" and {more} more rows" if more > 0 else "")


def nonfinite_rows_error(found: NonFinite, ids: Sequence[str], start: int, source: str) -> TributaryError:
    return TributaryError(
        f"{source}: non-finite gradient (NaN/inf) at {describe_rows(found, ids, start)}; the model overflows or "
        "holds NaN weights: check model.path and model.dtype (float16 overflows where float32 does not), or set "
        "data.on_nonfinite: skip to leave such rows out"
    )


def nonfinite_vector_modules(vector: np.ndarray, widths: Sequence[tuple[str, int]]) -> list[str]:
    """The modules whose part of a packed per-shard sum vector (consecutive `widths`) is not finite."""
    out, offset = [], 0
    for name, width in widths:
        if not np.isfinite(vector[offset : offset + width]).all():
            out.append(name)
        offset += width
    return out
