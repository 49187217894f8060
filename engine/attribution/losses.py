"""Per-example losses for a plain torch model, with what the Gauss-Newton curvature needs from each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as functional

Tensor = torch.Tensor


@dataclass(frozen=True)
class ExampleLoss:
    """A per-example loss and what the Gauss-Newton curvature needs from it.

    loss(outputs, targets) -> (B,) per-example losses (summed over output dimensions, not averaged);
    sample(outputs, generator) -> targets drawn from the model's predictive distribution (fisher=True);
    hessian_root(outputs) -> (B, K, K) with R Rᵀ = ∂²loss/∂outputs² per example (fisher="exact").
    """

    loss: Callable[[Tensor, Tensor], Tensor]
    sample: Callable[[Tensor, torch.Generator], Tensor] | None = None
    hessian_root: Callable[[Tensor], Tensor] | None = None


def flatten_outputs(outputs: Tensor) -> Tensor:
    """(B, ...) outputs as (B, K): one row of output dimensions per example."""
    return outputs.reshape(outputs.shape[0], -1)


def squared_error() -> ExampleLoss:
    """½‖f(x) − y‖² (Gaussian likelihood with unit variance)."""

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * ((flatten_outputs(outputs) - flatten_outputs(targets).to(outputs.dtype)) ** 2).sum(dim=1)

    def sample(outputs: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs.detach() + noise

    def hessian_root(outputs: Tensor) -> Tensor:
        width = flatten_outputs(outputs).shape[1]
        return torch.eye(width, dtype=outputs.dtype).expand(outputs.shape[0], width, width)

    return ExampleLoss(loss, sample, hessian_root)


def cross_entropy() -> ExampleLoss:
    """Softmax cross-entropy on logits (B, C) with integer targets (B,)."""

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return functional.cross_entropy(outputs, targets.long(), reduction="none")

    def sample(outputs: Tensor, generator: torch.Generator) -> Tensor:
        return torch.multinomial(torch.softmax(outputs.detach(), dim=-1), 1, generator=generator).squeeze(1)

    def hessian_root(outputs: Tensor) -> Tensor:
        p = torch.softmax(outputs.detach().to(torch.float64), dim=-1)
        hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        values, vectors = torch.linalg.eigh(hessian)
        return (vectors * values.clamp(min=0).sqrt().unsqueeze(-2)).to(outputs.dtype)

    return ExampleLoss(loss, sample, hessian_root)
