"""Projection matrices generated on the CPU by a counter-based generator keyed by (seed, module, side).

numpy's Philox is counter-based: the stream depends only on its 128-bit key, never on the device,
the torch thread count or which worker asks. Every worker therefore builds bit-identical matrices,
unlike TRAK's CUDA projector whose matrix depends on the GPU's SM count.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch


def _key(seed: int, module: str, side: str) -> int:
    digest = hashlib.sha256(f"tributary-projection/{seed}/{module}/{side}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def projection_matrix(seed: int, module: str, side: str, rows: int, cols: int, kind: str) -> np.ndarray:
    """A rows x cols float64 matrix with i.i.d. entries of variance 1/cols, so E[P Pᵀ] = I."""
    generator = np.random.Generator(np.random.Philox(key=_key(seed, module, side)))
    if kind == "rademacher":
        bits = generator.integers(0, 2, size=(rows, cols), dtype=np.int8)
        matrix = 2.0 * bits - 1.0
    elif kind == "gaussian":
        matrix = generator.standard_normal(size=(rows, cols))
    else:
        raise ValueError(f"unknown projection kind {kind!r}; use 'rademacher' or 'gaussian'")
    return matrix / np.sqrt(cols)


@dataclass(frozen=True)
class ModuleProjection:
    """How one module's gradient G (d_out x d_in) becomes G̃ = P_outᵀ G P_in (k_out x k_in)."""

    name: str
    d_in: int  # includes the bias column when the bias is tracked
    d_out: int
    k_in: int
    k_out: int
    offset: int  # first column of this module in a stored row

    @property
    def width(self) -> int:
        return self.k_in * self.k_out

    @property
    def identity_in(self) -> bool:
        return self.k_in == self.d_in

    @property
    def identity_out(self) -> bool:
        return self.k_out == self.d_out


@dataclass(frozen=True)
class ProjectionSpec:
    dim: int
    seed: int
    kind: str
    modules: tuple[ModuleProjection, ...]

    @property
    def total_width(self) -> int:
        return sum(module.width for module in self.modules)

    def to_dict(self) -> dict:
        return {
            "dim": self.dim,
            "seed": self.seed,
            "kind": self.kind,
            "modules": [asdict(module) for module in self.modules],
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, raw: dict) -> ProjectionSpec:
        modules = tuple(ModuleProjection(**module) for module in raw["modules"])
        return cls(dim=raw["dim"], seed=raw["seed"], kind=raw["kind"], modules=modules)

    def side_matrix(
        self, module: ModuleProjection, side: str, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """P_in (d_in x k_in) or P_out (d_out x k_out); None where that side is the identity."""
        rows, cols = (module.d_in, module.k_in) if side == "in" else (module.d_out, module.k_out)
        if rows == cols:
            return None
        matrix = projection_matrix(self.seed, module.name, side, rows, cols, self.kind)
        return torch.from_numpy(matrix).to(dtype=dtype, device=device)


def _side_width(dim: int, full: int) -> int:
    # A side as narrow as the projection is kept exact: projecting it would add noise and cost.
    return full if dim == 0 or dim >= full else dim


def build_projection(dim: int, seed: int, kind: str, shapes: list[tuple[str, int, int]]) -> ProjectionSpec:
    """`shapes` lists (module name, d_in incl. bias column, d_out) in tracking order."""
    modules = []
    offset = 0
    for name, d_in, d_out in shapes:
        module = ModuleProjection(
            name=name, d_in=d_in, d_out=d_out, k_in=_side_width(dim, d_in), k_out=_side_width(dim, d_out), offset=offset
        )
        modules.append(module)
        offset += module.width
    return ProjectionSpec(dim=dim, seed=seed, kind=kind, modules=tuple(modules))
