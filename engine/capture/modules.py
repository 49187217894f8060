"""Which modules are tracked and how each kind exposes (d_in, d_out) and its weight as d_out x d_in.

A kind registers itself by module type, so supporting a new layer kind is one small subclass.
peft's LoRA `lora_A` / `lora_B` are plain `nn.Linear`s, so they are tracked as Linear; when the model
is a peft model only those adapter modules are tracked (the base weights are frozen, not attributed).
Experts fused into 3-D parameters are tracked per expert through engine.capture.experts' slices, and a
mixture-of-experts router (a module of its own, not an nn.Linear) as the linear map to its logits.
"""

from __future__ import annotations

import fnmatch
from typing import ClassVar, TypeVar

import torch
from torch import nn

from engine.capture.experts import ExpertSlice, split_fused_experts
from engine.errors import TributaryError

ModuleType = TypeVar("ModuleType", bound=nn.Module)


def _as_kind(module: nn.Module, module_type: type[ModuleType]) -> ModuleType:
    """`module` typed as the kind's own module type (the registry dispatches on exactly that type)."""
    if not isinstance(module, module_type):
        raise TypeError(f"a {module_type.__name__} kind was given a {type(module).__name__}")
    return module


class TrackedKind:
    registry: ClassVar[dict[type, type[TrackedKind]]] = {}
    module_type: ClassVar[type]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        TrackedKind.registry[cls.module_type] = cls

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def weight_as_out_in(module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def for_module(cls, module: nn.Module) -> type[TrackedKind] | None:
        for module_type, kind in cls.registry.items():
            if type(module) is module_type:
                return kind
        return RouterKind if is_router(module) else None


def is_router(module: nn.Module) -> bool:
    """A mixture-of-experts router of transformers 5 (MixtralTopKRouter and its kin): its own (experts, d)
    `weight` (and optional bias), a `top_k`, and a forward returning (logits = x Wᵀ + b, weights, choice)."""
    weight = module._parameters.get("weight")
    own = set(module._parameters) - {"weight", "bias"}
    return (
        isinstance(getattr(module, "top_k", None), int)
        and weight is not None
        and weight.dim() == 2
        and not own
        and not any(True for _ in module.children())
    )


class RouterKind(TrackedKind):
    module_type = type("RouterModules", (), {})  # matched by is_router, not by type

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        weight = module._parameters["weight"]
        if weight is None:
            raise TypeError(f"router {type(module).__name__} has no weight")
        return weight.shape[1], weight.shape[0]

    @staticmethod
    def weight_as_out_in(module: nn.Module) -> torch.Tensor:
        weight = module._parameters["weight"]
        if weight is None:
            raise TypeError(f"router {type(module).__name__} has no weight")
        return weight


class ExpertSliceKind(TrackedKind):
    module_type = ExpertSlice

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        expert = _as_kind(module, ExpertSlice)
        return expert.in_features, expert.out_features

    @staticmethod
    def weight_as_out_in(module: nn.Module) -> torch.Tensor:
        return _as_kind(module, ExpertSlice).weight


class LinearKind(TrackedKind):
    module_type = nn.Linear

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        linear = _as_kind(module, nn.Linear)
        return linear.in_features, linear.out_features

    @staticmethod
    def weight_as_out_in(module: nn.Module) -> torch.Tensor:
        return _as_kind(module, nn.Linear).weight


try:  # HF GPT-2's Conv1D stores its weight transposed: (d_in, d_out), y = x @ W + b.
    from transformers.pytorch_utils import Conv1D

    class Conv1DKind(TrackedKind):
        module_type = Conv1D

        @staticmethod
        def dims(module: nn.Module) -> tuple[int, int]:
            weight = _as_kind(module, Conv1D).weight
            return weight.shape[0], weight.shape[1]

        @staticmethod
        def weight_as_out_in(module: nn.Module) -> torch.Tensor:
            return _as_kind(module, Conv1D).weight.t()
except ImportError:  # pragma: no cover - transformers is a hard dependency
    pass


try:  # Falcon's nn.Linear subclass computes the same x Wᵀ + b (written as a matmul)
    from transformers.models.falcon.modeling_falcon import FalconLinear

    class FalconLinearKind(LinearKind):
        module_type = FalconLinear
except ImportError:  # pragma: no cover - a transformers without Falcon
    pass


EXCLUDED_BY_DEFAULT = ("*lm_head*", "*embed*", "*wte*", "*wpe*")
LORA_PATTERNS = ("*lora_A*", "*lora_B*")


def is_peft_model(model: nn.Module) -> bool:
    return any(".lora_A." in name or name.endswith("lora_A") for name, _ in model.named_modules())


def select_modules(model: nn.Module, patterns: list[str] | None) -> dict[str, nn.Module]:
    """Tracked modules in registration order, chosen by fnmatch patterns on their qualified names (fused experts
    are split into per-expert slices first: engine.capture.experts)."""
    split_fused_experts(model)
    get_output_embeddings = getattr(model, "get_output_embeddings", None)  # HF models only
    output_embeddings = get_output_embeddings() if get_output_embeddings is not None else None
    supported = {
        name: module
        for name, module in model.named_modules()
        if TrackedKind.for_module(module) is not None and module is not output_embeddings
    }
    peft = is_peft_model(model)
    if peft:
        supported = {n: m for n, m in supported.items() if any(fnmatch.fnmatch(n, p) for p in LORA_PATTERNS)}
    if patterns is None:
        chosen = {n: m for n, m in supported.items() if not any(fnmatch.fnmatch(n, p) for p in EXCLUDED_BY_DEFAULT)}
        if not chosen:
            raise TributaryError("the model has no supported module (nn.Linear, GPT-2 Conv1D, LoRA) to track")
        return chosen
    chosen = {}
    for pattern in patterns:
        matched = {n: m for n, m in supported.items() if fnmatch.fnmatch(n, pattern)}
        if not matched:
            examples = ", ".join(list(supported)[:6])
            scope = "LoRA adapter modules" if peft else "supported modules"
            raise TributaryError(f"model.modules pattern {pattern!r} matches no {scope}; names look like: {examples}")
        chosen.update(matched)
    return {n: m for n, m in supported.items() if n in chosen}


def tracked_shapes(modules: dict[str, nn.Module], include_bias: bool) -> list[tuple[str, int, int]]:
    shapes = []
    for name, module in modules.items():
        kind = TrackedKind.for_module(module)
        if kind is None:
            raise TributaryError(f"module {name} ({type(module).__name__}) is not a supported kind to track")
        d_in, d_out = kind.dims(module)
        has_bias = include_bias and getattr(module, "bias", None) is not None
        shapes.append((name, d_in + int(has_bias), d_out))
    return shapes


def module_has_bias_column(module: nn.Module, include_bias: bool) -> bool:
    return include_bias and getattr(module, "bias", None) is not None
