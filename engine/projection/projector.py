"""Projection matrices generated on the CPU by a counter-based generator keyed by (seed, module, side).

numpy's Philox is counter-based: the stream depends only on its 128-bit key, never on the device,
the torch thread count or which worker asks. Every worker therefore builds bit-identical matrices,
unlike TRAK's CUDA projector whose matrix depends on the GPU's SM count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field as PydanticField

FITTED_KINDS = (
    "kfac_eigen",
    "eigen_sketch",
    "grad_pca",
    "grad_pca_whitened",
)  # data-dependent matrices, fitted before pass 1 and kept in the store
RANDOM_KINDS = ("rademacher", "gaussian")


def _key(seed: int, module: str, side: str) -> int:
    digest = hashlib.sha256(f"tributary-projection/{seed}/{module}/{side}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def projection_matrix(seed: int, module: str, side: str, rows: int, cols: int, kind: str) -> np.ndarray:
    """A rows x cols float64 matrix with i.i.d. entries of variance 1/cols, so E[P Pᵀ] = I (`kind` random; the
    fitted kinds' sketch of the complement draws from the same generator, gaussian)."""
    generator = np.random.Generator(np.random.Philox(key=_key(seed, module, side)))
    if kind == "rademacher":
        bits = generator.integers(0, 2, size=(rows, cols), dtype=np.int8)
        matrix = 2.0 * bits - 1.0
    elif kind == "gaussian":
        matrix = generator.standard_normal(size=(rows, cols))
    else:
        raise ValueError(f"unknown random projection kind {kind!r}; use 'rademacher' or 'gaussian'")
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
    fit_rows: int | None = None  # fitted kinds: rows the covariances were fitted on (None: all)
    top: int | None = None  # eigen_sketch: eigen-directions per side (None: dim // 2)
    fit: str = (
        "exact"  # fitted kinds: "exact" (full covariances) or "sketch" (one-pass Nyström, engine.projection.fitted)
    )
    budget: int | None = None  # projection.budget's numbers per row (k per module: engine.projection.budget)
    # fitted kinds: module -> (P_in, P_out), read from the store (engine.store) and checked against its checksums;
    # not part of the spec's identity, which the settings above fix
    # (Any, excluded: a manifest records the spec and the store the matrices, with their checksums)
    matrices: Annotated[Any, PydanticField(exclude=True)] = field(default=None, compare=False, repr=False)

    @property
    def total_width(self) -> int:
        return sum(module.width for module in self.modules)

    @property
    def fitted(self) -> bool:
        """The matrices come from the data (a fitting pass), not from the seed alone."""
        return self.kind in FITTED_KINDS and self.dim > 0

    def to_dict(self) -> dict:
        raw = {
            "dim": self.dim,
            "seed": self.seed,
            "kind": self.kind,
            "modules": [asdict(module) for module in self.modules],
        }
        if self.kind in FITTED_KINDS:  # absent for random kinds, so their fingerprints are those of older stores
            raw.update(fit_rows=self.fit_rows, top=self.top)
            if self.fit != "exact":  # absent for an exact fit, so its fingerprint is that of a version-3 store
                raw["fit"] = self.fit
        if self.budget is not None:  # absent without a budget, so a fixed dim's fingerprint is unchanged
            raw["budget"] = self.budget
        return raw

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, raw: dict) -> ProjectionSpec:
        modules = tuple(ModuleProjection(**module) for module in raw["modules"])
        return cls(
            dim=raw["dim"],
            seed=raw["seed"],
            kind=raw["kind"],
            modules=modules,
            fit_rows=raw.get("fit_rows"),
            top=raw.get("top"),
            fit=raw.get("fit", "exact"),
            budget=raw.get("budget"),
        )

    def with_matrices(self, matrices: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ProjectionSpec:
        """This spec with its fitted matrices, each checked against the module's shape."""
        for module in self.modules:
            if module.name not in matrices:
                raise ValueError(f"no fitted projection for module {module.name}")
            p_in, p_out = matrices[module.name]
            if p_in.shape != (module.d_in, module.k_in) or p_out.shape != (module.d_out, module.k_out):
                raise ValueError(
                    f"fitted projection of {module.name} is {p_in.shape}/{p_out.shape}, not "
                    f"{(module.d_in, module.k_in)}/{(module.d_out, module.k_out)}"
                )
        return replace(self, matrices=dict(matrices))

    def side_matrix(
        self, module: ModuleProjection, side: str, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """P_in (d_in x k_in) or P_out (d_out x k_out); None where that side is the identity."""
        rows, cols = (module.d_in, module.k_in) if side == "in" else (module.d_out, module.k_out)
        if self.fitted:
            if self.matrices is None:
                raise ValueError(
                    f"projection kind {self.kind} needs its fitted matrices (ProjectionSpec.with_matrices)"
                )
            matrix = self.matrices[module.name][0 if side == "in" else 1]
        elif rows == cols:
            return None
        else:
            matrix = projection_matrix(self.seed, module.name, side, rows, cols, self.kind)
        return torch.from_numpy(np.ascontiguousarray(matrix)).to(dtype=dtype, device=device)


def _side_width(dim: int, full: int) -> int:
    # A side as narrow as the projection is kept exact: projecting it would add noise and cost.
    return full if dim == 0 or dim >= full else dim


def build_projection(
    dim: int,
    seed: int,
    kind: str,
    shapes: list[tuple[str, int, int]],
    fit_rows: int | None = None,
    top: int | None = None,
    fit: str = "exact",
    widths: Mapping[str, tuple[int, int]] | None = None,
    budget: int | None = None,
) -> ProjectionSpec:
    """`shapes` lists (module name, d_in incl. bias column, d_out) in tracking order. A fitted kind keeps a side
    as narrow as `dim` at full width too, as a rotation into its eigenbasis (the same scores as the identity).
    `widths` (with `budget`, the numbers per row they were allocated from) gives each module its own (k_in, k_out)
    in place of `dim`; a side as wide as the module stays the identity."""
    modules = []
    offset = 0
    for name, d_in, d_out in shapes:
        k_in, k_out = (_side_width(dim, d_in), _side_width(dim, d_out)) if widths is None else widths[name]
        module = ModuleProjection(name=name, d_in=d_in, d_out=d_out, k_in=k_in, k_out=k_out, offset=offset)
        modules.append(module)
        offset += module.width
    return ProjectionSpec(
        dim=dim, seed=seed, kind=kind, modules=tuple(modules), fit_rows=fit_rows, top=top, fit=fit, budget=budget
    )
