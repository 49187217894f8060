"""A mixture-of-experts block with one `nn.Linear` module per expert and projection, as transformers 4 built
Mixtral (`MixtralBlockSparseTop2MLP` experts in an `nn.ModuleList`, each called on the rows routed to it).

No causal LM family of transformers 5 keeps its experts this way (they are fused into 3-D parameters), but hand-
built and older checkpoints do. `with_linear_experts` rebuilds a transformers 5 Mixtral's blocks in this form from
the same weights and router, so the two forms compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class LinearExpert(nn.Module):
    """One expert: down(act(gate x) * up x), three nn.Linear modules (transformers 4's w1, w3, w2)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.w1 = _linear(gate)
        self.w3 = _linear(up)
        self.w2 = _linear(down)
        self.act_fn = act_fn

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(rows)) * self.w3(rows))


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


class LinearExpertsBlock(nn.Module):
    """transformers 4's MixtralSparseMoeBlock: the router's top-k, then each expert given its routed rows
    (`hidden_states[None, tokens]`, in top-k slot order, as `torch.where` on the permuted one-hot gives them)."""

    def __init__(self, gate: nn.Module, experts: list[LinearExpert]):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, length, width = hidden_states.shape
        flat = hidden_states.view(-1, width)
        _, weights, choice = self.gate(flat)
        output = torch.zeros_like(flat)
        mask = functional.one_hot(choice, num_classes=len(self.experts)).permute(2, 1, 0)
        for index, expert in enumerate(self.experts):
            slot, tokens = torch.where(mask[index])
            if tokens.numel() == 0:
                continue
            rows = flat[None, tokens].reshape(-1, width)
            out = expert(rows) * weights[tokens, slot, None]
            output.index_add_(0, tokens, out.to(flat.dtype))
        return output.reshape(batch_size, length, width)


def with_linear_experts(model: nn.Module) -> nn.Module:
    """`model` (a transformers 5 Mixtral) with each sparse block rebuilt as a `LinearExpertsBlock` holding the
    same weights and the same router module."""
    for layer in model.get_submodule("model.layers").children():
        gate, fused = layer.get_submodule("mlp.gate"), layer.get_submodule("mlp.experts")
        gate_up, down = fused.get_parameter("gate_up_proj"), fused.get_parameter("down_proj")
        experts = []
        for expert in range(gate_up.shape[0]):
            gate_weight, up_weight = gate_up[expert].chunk(2, dim=0)
            experts.append(LinearExpert(gate_weight, up_weight, down[expert], fused.act_fn))
        layer.mlp = LinearExpertsBlock(gate, experts)
    return model
