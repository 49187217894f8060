"""Accumulate the curvature sums of every tracked module from captured batches: the one loop body of the
store's gradient and Λ passes and of in-memory attribution."""

from __future__ import annotations

import numpy as np
import torch

from engine.curvature.factors import ModuleFactors
from engine.curvature.statistics import ModuleCovariance, ModuleLambda, add_covariance, add_lambda
from engine.projection import ProjectionSpec

Sketch = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]  # module → (Ω_in, Ω_out), None: that side exact


class CovarianceAccumulator:
    """Pass 1's sums for every tracked module, added a batch at a time; `upcast` False: products in a float32
    model's own dtype (the fitting pass's full-width covariances, which only choose eigenvectors); `sketch`: C Ω
    in place of C on the sides it gives an Ω for (the fitting pass's Nyström sketch)."""

    def __init__(self, spec: ProjectionSpec, upcast: bool = True, sketch: Sketch | None = None):
        self.sketch = sketch or {}

        def width(omega: torch.Tensor | None) -> int | None:
            return None if omega is None else omega.shape[1]

        self.sums = {}
        for m in spec.modules:
            omega_in, omega_out = self.sketch.get(m.name, (None, None))
            self.sums[m.name] = ModuleCovariance.zeros(m.k_in, m.k_out, width(omega_in), width(omega_out))
        self.upcast = upcast

    def add(
        self, activations: dict[str, list[torch.Tensor]], deltas: dict[str, list[torch.Tensor]], mask: torch.Tensor
    ) -> None:
        """One batch: each module's activations and curvature δ̃ per call (`add_covariance`), `mask` (B, T)."""
        for name, target in self.sums.items():
            sketch = self.sketch.get(name, (None, None))
            add_covariance(target, activations[name], deltas[name], mask, self.upcast, sketch)


class LambdaAccumulator:
    """Pass 2's sums for every tracked module in the basis of `factors` (raw where they are not rotated),
    of gradients scaled elementwise by `scale` (see `add_lambda`), added a batch at a time on `device`."""

    def __init__(
        self,
        spec: ProjectionSpec,
        factors: dict[str, ModuleFactors],
        scale: dict[str, np.ndarray] | None = None,
        device: torch.device = torch.device("cpu"),
    ):
        self.sums = {m.name: ModuleLambda.zeros(m.k_in, m.k_out) for m in spec.modules}
        self._bases = {
            name: (torch.from_numpy(f.q_s).to(device), torch.from_numpy(f.q_a).to(device)) if f.rotated else None
            for name, f in factors.items()
        }
        self._scales = {
            name: torch.from_numpy(np.asarray(value, dtype=np.float64)).to(device)
            for name, value in (scale or {}).items()
        }

    def add(self, grads: dict[str, torch.Tensor], count: bool = True) -> None:
        """Per-example gradients (B, k_out, k_in) per module; `count` False: a further label draw of the same
        examples."""
        for name, module_grads in grads.items():
            add_lambda(self.sums[name], module_grads, self._bases[name], self._scales.get(name), count=count)
