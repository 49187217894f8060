"""Adam/AdamW second moments from a checkpoint's optimizer state (a torch `optimizer.state_dict()`, as the
HF Trainer saves in `checkpoint-STEP/optimizer.pt`), matched to the model's parameters and turned into
Adam's preconditioner P per tracked module.

A state dict knows its parameters only by position. The positions are matched against the model's
trainable parameters in two orders — `named_parameters()` order, and the HF Trainer's (parameters with
weight decay first, then the rest) — by shape; a state that fits neither is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.capture.modules import TrackedKind
from engine.config import OptimizerConfig
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.training_run.preconditioner import module_preconditioner


def _trainer_order(model: nn.Module, names: list[str]) -> list[str] | None:
    try:
        from transformers import Trainer

        # an instance method that never reads self; transformers types self as Trainer
        decay = set(Trainer.get_decay_parameter_names(None, model))  # pyright: ignore[reportArgumentType]
    except Exception:  # noqa: BLE001 - transformers' Trainer is optional here
        return None
    return [n for n in names if n in decay] + [n for n in names if n not in decay]


def _state_positions(state: dict) -> list[int]:
    return [index for group in state["param_groups"] for index in group["params"]]


def match_state(state: dict, model: nn.Module, where: str) -> dict[str, dict]:
    """Parameter name → its per-parameter optimizer state (step, exp_avg_sq, ...)."""
    parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    names = [name for name, _ in parameters]
    shapes = dict(parameters)
    positions = _state_positions(state)
    per_position = state["state"]
    stated = [
        (index, tuple(per_position[index]["exp_avg_sq"].shape))
        for index in positions
        if index in per_position and "exp_avg_sq" in per_position[index]
    ]
    if not stated:
        raise TributaryError(
            f"optimizer state {where} has no exp_avg_sq (Adam second moments); "
            "training_run.optimizer.preconditioned needs an Adam/AdamW state"
        )
    for order in (names, _trainer_order(model, names)):
        if order is None or len(order) != len(positions):
            continue
        by_position = dict(zip(positions, order))
        if all(shapes[by_position[index]] == shape for index, shape in stated):
            return {by_position[index]: per_position[index] for index, _ in stated}
    raise TributaryError(
        f"optimizer state {where} does not match the model's parameters: it holds {len(positions)} parameters "
        f"(first shapes {[s for _, s in stated[:3]]}) and the model {len(names)} (first shapes "
        f"{[shapes[n] for n in names[:3]]}); use the optimizer state saved with this checkpoint"
    )


def read_preconditioner(
    checkpoint: str,
    model: nn.Module,
    modules: dict[str, nn.Module],
    spec: ProjectionSpec,
    include_bias: bool,
    optimizer: OptimizerConfig,
) -> dict[str, np.ndarray]:
    """P = 1/(√v̂ + ε) of one checkpoint, per tracked module in the stored (k_out, k_in) layout."""
    path = Path(checkpoint) / optimizer.state_file
    if not path.is_file():
        raise TributaryError(
            f"training_run.optimizer.preconditioned needs the optimizer state {path}; it does not "
            "exist (save it with the checkpoint, or set preconditioned: false)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise TributaryError(f"optimizer state {path} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise TributaryError(f"optimizer state {path} is not a torch optimizer state_dict")
    matched = match_state(state, model, str(path))
    group = state["param_groups"][0]
    beta2 = optimizer.beta2 if optimizer.beta2 is not None else float(group.get("betas", (0.9, 0.999))[1])
    eps = optimizer.eps if optimizer.eps is not None else float(group.get("eps", 1e-8))
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for module in spec.modules:
        layer = modules[module.name]
        if id(layer.weight) not in names:  # an expert's slice of a fused 3-D parameter (engine.capture.experts)
            raise TributaryError(
                f"module {module.name} is one expert's slice of a fused parameter, whose optimizer moments are not "
                "split per expert yet; leave the experts out with model.modules, or set "
                "training_run.optimizer.preconditioned: false"
            )
        weight_name = names[id(layer.weight)]
        bias = getattr(layer, "bias", None) if include_bias else None
        moments = []
        for name in [weight_name] + ([names[id(bias)]] if bias is not None else []):
            if name not in matched:
                raise TributaryError(f"optimizer state {path} has no second moments for {name}")
            entry = matched[name]
            moments.append((entry["exp_avg_sq"].double().numpy(), int(torch.as_tensor(entry.get("step", 1)).item())))
        kind = TrackedKind.for_module(layer)
        if kind is None:
            raise ValueError(f"module {module.name} ({type(layer).__name__}) is not a tracked module kind")
        transposed = kind.weight_as_out_in(layer) is not layer.weight  # GPT-2 Conv1D
        weight = (moments[0][0].T, moments[0][1]) if transposed else moments[0]
        out[module.name] = module_preconditioner(
            module, weight, moments[1] if len(moments) > 1 else None, beta2, eps, f"optimizer state {path}"
        )
    return out


def meta_model(path: str, trust_remote_code: bool = False) -> nn.Module:
    """The model's structure without its weights (meta device): names, shapes and module types. With
    `trust_remote_code` the checkpoint's own code builds it, as it builds the loaded model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = {"trust_remote_code": trust_remote_code}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(path, local_files_only=True, **trust), **trust
        )
