"""Adam's preconditioner P = 1/(√v̂ + ε) of the tracked modules, read from the live optimizer's state (keyed by
the parameters themselves, so no matching by position is needed as for a saved optimizer.pt)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.capture.modules import TrackedKind
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.training_run.preconditioner import module_preconditioner


def _moments(
    optimizer: torch.optim.Optimizer, parameter: torch.Tensor | nn.Module, name: str
) -> tuple[np.ndarray, int]:
    if hasattr(parameter, "ds_id"):
        return _partitioned_moments(optimizer, parameter, name)
    state = optimizer.state.get(parameter, {}) if isinstance(parameter, torch.Tensor) else {}
    if "exp_avg_sq" not in state:
        raise TributaryError(
            f"the optimizer holds no exp_avg_sq (Adam second moments) for {name}; training_run.optimizer."
            "preconditioned needs an Adam/AdamW optimizer over the tracked modules"
        )
    return state["exp_avg_sq"].detach().double().cpu().numpy(), int(torch.as_tensor(state.get("step", 1)).item())


def _partitioned_moments(optimizer: torch.optim.Optimizer, parameter, name: str) -> tuple[np.ndarray, int]:
    """A ZeRO-3 parameter's exp_avg_sq, gathered whole from the ranks' flat partitions (collective: every rank
    asks for the same parameters in the same order); the step from the flat partitions' own state."""
    from deepspeed.utils import safe_get_full_optimizer_state

    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    moments = safe_get_full_optimizer_state(parameter, "exp_avg_sq") if steps else None
    if moments is None:
        raise TributaryError(
            f"the ZeRO-3 optimizer holds no exp_avg_sq (Adam second moments) for {name}; training_run.optimizer."
            "preconditioned needs an Adam/AdamW client optimizer over the tracked modules"
        )
    return moments.detach().double().cpu().numpy(), int(torch.as_tensor(steps[0]).item())


def live_preconditioner(
    optimizer: torch.optim.Optimizer,
    modules: dict[str, nn.Module],
    spec: ProjectionSpec,
    include_bias: bool,
    beta2: float | None,
    eps: float | None,
) -> dict[str, np.ndarray]:
    """P per tracked module in the stored (k_out, k_in) layout, as engine.training_run.optimizer_state reads it
    from a checkpoint's optimizer state."""
    group = optimizer.param_groups[0]
    beta2 = beta2 if beta2 is not None else float(group.get("betas", (0.9, 0.999))[1])
    eps = eps if eps is not None else float(group.get("eps", 1e-8))
    out = {}
    for module in spec.modules:
        layer = modules[module.name]
        kind = TrackedKind.for_module(layer)
        if kind is None:
            raise ValueError(f"module {module.name} ({type(layer).__name__}) is not a tracked module kind")
        weight = _moments(optimizer, layer.weight, f"{module.name}.weight")
        if kind.weight_as_out_in(layer) is not layer.weight:  # GPT-2 Conv1D stores (d_in, d_out)
            weight = (weight[0].T, weight[1])
        bias = getattr(layer, "bias", None) if include_bias else None
        bias_moments = None if bias is None else _moments(optimizer, bias, f"{module.name}.bias")
        out[module.name] = module_preconditioner(module, weight, bias_moments, beta2, eps, "the live optimizer state")
    return out
