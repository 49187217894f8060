"""TRAK-style dense curvature: per module, Σ_i vec(G̃_i) vec(G̃_i)ᵀ over the stored training rows (ΦᵀΦ).

A mergeable sum like the Kronecker statistics, but k × k with k = k_out·k_in, so it is only formed when
every module's projected width is at most MAX_DENSE_WIDTH (k ≤ 4096 per module costs 128 MiB in float64).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from engine.curvature.factors import ModuleFactors, dense_factors
from engine.errors import TributaryError
from engine.projection import ProjectionSpec

MAX_DENSE_WIDTH = 4096


def check_dense_width(spec: ProjectionSpec) -> None:
    wide = [(m.name, m.width) for m in spec.modules if m.width > MAX_DENSE_WIDTH]
    if wide:
        shown = ", ".join(f"{name} ({width})" for name, width in wide[:4])
        raise TributaryError(
            f"method trak forms a dense inverse per module, but these modules are wider than {MAX_DENSE_WIDTH} "
            f"after projection: {shown}; index with a smaller projection.dim (k_out·k_in ≤ {MAX_DENSE_WIDTH})"
        )


def gram_sums(blocks: Iterable[np.ndarray], spec: ProjectionSpec) -> dict[str, np.ndarray]:
    """Σ_i g_i g_iᵀ per module over row blocks (n, D), accumulated in float64."""
    check_dense_width(spec)
    sums = {m.name: np.zeros((m.width, m.width)) for m in spec.modules}
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        for m in spec.modules:
            part = block[:, m.offset : m.offset + m.width]
            sums[m.name] += part.T @ part
    return sums


def dense_gram_factors(blocks: Iterable[np.ndarray], spec: ProjectionSpec) -> dict[str, ModuleFactors]:
    return {name: dense_factors(gram) for name, gram in gram_sums(blocks, spec).items()}
