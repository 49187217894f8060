"""Adam's diagonal preconditioner P = 1/(√v̂ + ε) (Source App. C) per tracked module, laid out like the
module's stored gradient.

P is mapped onto the projected layout (k_out, k_in), bias column last: exactly, elementwise, where the module is not projected
(projection.dim 0, or both sides narrower than dim); otherwise replaced by its mean over the module's
weights, because an elementwise scale does not commute with a random projection (a per-module scalar does).
"""

from __future__ import annotations

import numpy as np

from engine.errors import TributaryError
from engine.projection import ModuleProjection


def adam_preconditioner(exp_avg_sq: np.ndarray, step: int, beta2: float, eps: float) -> np.ndarray:
    """P = 1/(√v̂ + ε) with v̂ = v/(1 − β₂^t): the diagonal Adam multiplies the gradient by (momentum aside)."""
    corrected = np.asarray(exp_avg_sq, dtype=np.float64) / (1.0 - beta2 ** max(int(step), 1))
    return 1.0 / (np.sqrt(corrected) + eps)


def module_layout(weight: np.ndarray, bias: np.ndarray | None, module: ModuleProjection, what: str) -> np.ndarray:
    """A per-weight quantity (d_out, d_in) [+ bias (d_out,)] as the module's (k_out, k_in) stored layout."""
    weight = np.asarray(weight, dtype=np.float64)
    full = weight if bias is None else np.concatenate([weight, np.asarray(bias, dtype=np.float64)[:, None]], axis=1)
    if full.shape != (module.d_out, module.d_in):
        raise TributaryError(
            f"{what} for module {module.name} has shape {full.shape} (weight{' + bias' if bias is not None else ''}), "
            f"but the module's gradient is {module.d_out} x {module.d_in}; the optimizer state does not belong to "
            "these parameters"
        )
    if module.identity_in and module.identity_out:
        return full
    return np.full((module.k_out, module.k_in), float(full.mean()))


def module_preconditioner(
    module: ModuleProjection,
    weight: tuple[np.ndarray, int],
    bias: tuple[np.ndarray, int] | None,
    beta2: float,
    eps: float,
    what: str,
) -> np.ndarray:
    """P of one module in its stored layout from (second moments v, optimizer step t) of its weight, laid out
    (d_out, d_in), and of its bias (None without a bias column); `what` names the state in errors."""
    bias_preconditioner = None if bias is None else adam_preconditioner(*bias, beta2, eps)
    return module_layout(adam_preconditioner(*weight, beta2, eps), bias_preconditioner, module, what)


def average(preconditioners: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The segment's P̄: the elementwise mean over its checkpoints."""
    return {name: np.mean([p[name] for p in preconditioners], axis=0) for name in preconditioners[0]}


def square_root(preconditioner: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """P^{1/2}: the elementwise scale of the gradients whose curvature is P^{1/2} H P^{1/2}."""
    return {name: np.sqrt(p) for name, p in preconditioner.items()}
