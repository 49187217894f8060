"""Accumulate the curvature sums of every tracked module from captured batches: the one loop body of the
store's gradient and Λ passes and of in-memory attribution."""

from __future__ import annotations

import numpy as np
import torch

from engine.capture.capture import example_gradient
from engine.curvature.factors import ModuleFactors
from engine.curvature.statistics import (
    ModuleCovariance,
    ModuleLambda,
    add_covariance,
    add_gradient_gram,
    add_lambda,
)
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
        self,
        activations: dict[str, list[torch.Tensor]],
        deltas: dict[str, list[torch.Tensor]],
        mask: torch.Tensor,
        routed_tokens: dict[str, int] | None = None,
    ) -> None:
        """One batch: each module's activations and curvature δ̃ per call (`add_covariance`), `mask` (B, T);
        `routed_tokens`: the counted tokens each routed expert saw (`ForwardPass.routed_tokens`), so that its
        ã ãᵀ is a mean over its own tokens; the other modules count every token of `mask`."""
        routed = routed_tokens or {}
        for name, target in self.sums.items():
            sketch = self.sketch.get(name, (None, None))
            add_covariance(target, activations[name], deltas[name], mask, self.upcast, sketch, routed.get(name))


class GradientGramAccumulator(CovarianceAccumulator):
    """The grad_pca fitting pass's sums: per module, Σ_n G_nᵀ G_n and Σ_n G_n G_nᵀ of the per-example gradients
    G_n = Σ_t δ̃_t ã_tᵀ at full width (`add_gradient_gram`), in ModuleCovariance's a_sum and s_sum."""

    def __init__(self, spec: ProjectionSpec, sketch: Sketch | None = None):
        super().__init__(spec, upcast=False, sketch=sketch)

    def add(
        self,
        activations: dict[str, list[torch.Tensor]],
        deltas: dict[str, list[torch.Tensor]],
        mask: torch.Tensor,
        routed_tokens: dict[str, int] | None = None,
    ) -> None:
        for name, target in self.sums.items():
            grads = example_gradient(deltas[name], activations[name])
            add_gradient_gram(target, grads, mask, self.sketch.get(name, (None, None)))


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

    def add(self, grads: dict[str, torch.Tensor], count: bool = True, rotated: frozenset[str] = frozenset()) -> None:
        """Per-example gradients (B, k_out, k_in) per module; `count` False: a further label draw of the same
        examples; `rotated`: the modules whose gradients are already in the eigenbasis (`token_gradients`)."""
        for name, module_grads in grads.items():
            basis = None if name in rotated else self._bases[name]
            add_lambda(self.sums[name], module_grads, basis, self._scales.get(name), count=count)

    def token_gradients(
        self, activations: dict[str, list[torch.Tensor]], deltas: dict[str, list[torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        """One batch's per-example gradients from per-token ã (B, T, k_in) and δ̃ (B, T, k_out) per module call, for
        `add`, and the modules among them already rotated (`module_token_gradient`)."""
        grads, rotated = {}, set()
        for name in self.sums:
            grads[name], was_rotated = self.module_token_gradient(name, activations[name], deltas[name])
            if was_rotated:
                rotated.add(name)
        return grads, frozenset(rotated)

    def module_token_gradient(
        self, name: str, acts: list[torch.Tensor], dels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """One module's per-example gradients (B, k_out, k_in) and whether they are in the eigenbasis already:
        Q_Sᵀ (Σ_t δ̃ ãᵀ) Q_A = Σ_t (Q_Sᵀ δ̃)(Q_Aᵀ ã)ᵀ, so where rotating the tokens costs less than rotating each
        example's gradient (`tokens_first`: at full width on rows shorter than the module is wide) the tokens are
        rotated before the product."""
        basis = self._bases[name]
        if basis is not None and name not in self._scales and tokens_first(acts, dels):
            q_s, q_a = basis
            acts = [a @ q_a.to(a.dtype) for a in acts]
            dels = [d @ q_s.to(d.dtype) for d in dels]
            return example_gradient(dels, acts), True
        return example_gradient(dels, acts), False


def tokens_first(activations: list[torch.Tensor], deltas: list[torch.Tensor]) -> bool:
    """Whether rotating a batch's tokens (Σ_calls T (k_in² + k_out²) products an example) costs less than rotating
    its per-example gradients (k_out k_in (k_in + k_out)); the per-example product itself costs the same either
    way. Projected (k = 16) it never does; at projection dim 0 it does for rows shorter than about the width."""
    k_in, k_out = activations[0].shape[-1], deltas[0].shape[-1]
    tokens = sum(a.shape[1] for a in activations)
    return tokens * (k_in * k_in + k_out * k_out) < k_in * k_out * (k_in + k_out)
