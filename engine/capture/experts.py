"""Routed experts fused into 3-D parameters, split into one trackable linear map per expert and projection.

transformers 5 stores a mixture-of-experts layer's experts as 3-D parameters (`gate_up_proj` or `up_proj`, and
`down_proj`, one (d_out, d_in) slice per expert; transposed in gpt-oss, with biases there too) and computes them
with `grouped_mm` or a batched matmul, neither of which exposes one expert's inputs. `split_fused_experts`
gives each such module an `ExpertSlice` per expert and projection (`<experts>.gate_up.<e>`, `<experts>.down.<e>`),
views of the 3-D parameter that hold no parameter of their own (so `named_parameters()`, state dicts and
optimizer states keep the model's names), and replaces the module's forward with a loop over experts that sends
each expert only the tokens routed to it, through its slices. A slice records the flat (batch x position) index
of each row it computes (`positions`), so a token's gradient goes to the experts it was routed to and nowhere else.

The loop runs in any dtype: this is the float64 path too (`grouped_mm` refuses float64), and in bf16/float32 it
equals transformers' eager experts forward up to the order of a sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from engine.errors import TributaryError

FUSED_PROJECTIONS = (("gate_up_proj", "gate_up"), ("up_proj", "up"), ("down_proj", "down"))


class ExpertSlice(nn.Module):
    """One expert's (d_out, d_in) linear map inside a fused 3-D parameter; y = x Wᵀ + b for the rows it is given."""

    def __init__(self, fused: nn.Parameter, bias: nn.Parameter | None, expert: int, transposed: bool):
        super().__init__()
        # a tuple, so nn.Module does not register the fused parameter a second time under this slice
        self._source = (fused, bias)
        self.expert = expert
        self.transposed = transposed
        self.positions: torch.Tensor | None = None  # flat token index of each row of the current call

    @property
    def weight(self) -> torch.Tensor:
        fused = self._source[0][self.expert]
        return fused.t() if self.transposed else fused

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self._source[1]
        return None if bias is None else bias[self.expert]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The slice's own values (for fingerprints and devices); the model's parameters stay the fused ones."""
        yield prefix + "weight", self.weight
        if self.bias is not None:
            yield prefix + "bias", self.bias

    def parameters(self, recurse: bool = True):
        for _, value in self.named_parameters():
            yield value

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return functional.linear(rows, self.weight, self.bias)

    def routed(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The expert's output for `rows`, the tokens at flat `positions` (what the capture hooks read)."""
        self.positions = positions
        try:
            return self(rows)
        finally:
            self.positions = None


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D projection parameters and a `num_experts`."""
    down = getattr(module, "down_proj", None)
    return (
        isinstance(down, nn.Parameter)
        and down.dim() == 3
        and isinstance(getattr(module, "num_experts", None), int)
        and not isinstance(module, nn.Linear)
    )


def fused_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if is_fused_experts(module)}


def refuse_partitioned_experts(model: nn.Module) -> None:
    """placement.kind zero3 partitions each parameter across ranks, and a split expert is a view of one slice of
    a 3-D parameter: refused (from the model's structure, before a group starts) rather than attributed."""
    names = list(fused_experts_modules(model))
    if names:
        module = model.get_submodule(names[0])
        raise TributaryError(
            f"placement.kind zero3 would partition the fused 3-D expert weights of {type(module).__name__} "
            f"({names[0]} and {len(names) - 1} more), which Tributary splits per expert; use placement.kind single "
            "or device_map for this mixture-of-experts model"
        )


def split_fused_experts(model: nn.Module) -> list[str]:
    """Give every fused experts module of `model` its per-expert slices and routed loop (idempotent); the names
    of the modules split."""
    split = []
    for name, module in fused_experts_modules(model).items():
        if routed_loop(module) is None:
            _split(module)
        split.append(name)
    return split


def routed_loop(module: nn.Module) -> RoutedExperts | None:
    """The routed loop `split_fused_experts` gave `module`, if it did."""
    loop = module.__dict__.get("_tributary_routed")
    return loop if isinstance(loop, RoutedExperts) else None


def _split(module: nn.Module) -> None:
    if any(hasattr(p, "ds_numel") for p in module._parameters.values()):
        raise TributaryError(
            f"placement.kind zero3 partitions {type(module).__name__}'s fused 3-D expert weights, which Tributary "
            "splits per expert; use placement.kind single or device_map for this mixture-of-experts model"
        )
    transposed = bool(getattr(module, "is_transposed", False))
    slices: dict[str, list[ExpertSlice]] = {}
    for parameter_name, slice_name in FUSED_PROJECTIONS:
        fused = getattr(module, parameter_name, None)
        if not isinstance(fused, nn.Parameter) or fused.dim() != 3:
            continue
        bias = getattr(module, parameter_name + "_bias", None)
        bias = bias if isinstance(bias, nn.Parameter) else None
        experts = [ExpertSlice(fused, bias, e, transposed) for e in range(fused.shape[0])]
        module.add_module(slice_name, nn.ModuleList(experts))
        slices[slice_name] = experts
    if "down" not in slices or not ("gate_up" in slices or "up" in slices):
        raise TributaryError(
            f"{type(module).__name__} holds 3-D expert weights Tributary cannot split per expert (it needs "
            "gate_up_proj or up_proj, and down_proj); choose other modules with model.modules"
        )
    loop = RoutedExperts(module, slices)
    module.__dict__["_tributary_routed"] = loop
    module.forward = loop.forward


class RoutedExperts:
    """transformers' eager experts loop, through the per-expert slices: each expert sees only its routed tokens."""

    def __init__(self, module: nn.Module, slices: dict[str, list[ExpertSlice]]):
        self.module = module
        self.gated = "gate_up" in slices
        self.first = slices["gate_up"] if self.gated else slices["up"]
        self.down = slices["down"]

    @property
    def slices(self) -> list[ExpertSlice]:
        return [*self.first, *self.down]

    def _call(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The experts module's own gate, activation or norm (methods and submodules transformers gives it)."""
        step = cast(Callable[[torch.Tensor], torch.Tensor], getattr(self.module, name))
        return step(values)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states (N, d); the router's top-k choice and weights (N, k)."""
        module = self.module
        output = torch.zeros_like(hidden_states)
        for expert in range(len(self.first)):
            tokens, choice = torch.where(top_k_index == expert)
            if tokens.numel() == 0:
                continue
            hidden = self.first[expert].routed(hidden_states[tokens], tokens)
            hidden = self._call("_apply_gate" if self.gated else "act_fn", hidden)
            out = self.down[expert].routed(hidden, tokens)
            if getattr(module, "has_post_expert_norm", False):
                out = self._call("post_expert_norm", out)
            out = out * top_k_weights[tokens, choice, None]
            output.index_add_(0, tokens, out.to(output.dtype))
        return output
