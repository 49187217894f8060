"""Independent references for the small-model tests: per-example gradients by torch.func (vmap of grad),
and the exact derivative of a query loss w.r.t. per-example weights, by autograd through a whole
training loop (SGD, SGD with momentum, or Adam), full batch, weights (1 + ε_i) on the mean loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.projection import projection_matrix

Parameters = dict[str, torch.Tensor]


def mlp(inputs: int, hidden: int, outputs: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).double()


def squared_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).reshape(len(outputs), -1).sum(dim=1)


def per_example_gradients(
    model: nn.Module,
    parameters: Parameters,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss=squared_loss,
    dim: int = 0,
    seed: int = 0,
    kind: str = "rademacher",
) -> np.ndarray:
    """(N, D) in the store layout: per nn.Linear, the d_out x (d_in + bias) gradient, projected to
    P_outᵀ G P_in when `dim` > 0 (sides not wider than dim kept exact), row-major, modules in order."""

    def one(params: Parameters, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, params, (x[None],)), y[None]).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0))(parameters, inputs, targets)
    pieces = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        prefix = f"{name}." if name else ""
        weight = grads[f"{prefix}weight"]
        full = weight if module.bias is None else torch.cat([weight, grads[f"{prefix}bias"][:, :, None]], dim=2)
        d_out, d_in = full.shape[1:]
        if dim and d_in > dim:
            full = full @ torch.from_numpy(projection_matrix(seed, name, "in", d_in, dim, kind))
        if dim and d_out > dim:
            full = torch.from_numpy(projection_matrix(seed, name, "out", d_out, dim, kind)).T @ full
        pieces.append(full.reshape(len(inputs), -1))
    return torch.cat(pieces, dim=1).numpy()


def module_widths(model: nn.Module, dim: int = 0) -> list[int]:
    widths = []
    for module in model.modules():
        if type(module) is nn.Linear:
            d_in, d_out = module.in_features + (module.bias is not None), module.out_features
            widths.append((min(d_in, dim) if dim else d_in) * (min(d_out, dim) if dim else d_out))
    return widths


def split_modules(rows: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    bounds = np.cumsum([0] + widths)
    return [rows[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


Step = Callable[[Parameters, list[torch.Tensor], int], Parameters]


def sgd(learning_rates: list[float], momentum: float = 0.0) -> Step:
    state: dict[str, torch.Tensor] = {}

    def step(params: Parameters, grads: list[torch.Tensor], k: int) -> Parameters:
        out = {}
        for (name, p), g in zip(params.items(), grads):
            buffer = g if k == 0 or momentum == 0 else momentum * state[name] + g
            state[name] = buffer
            out[name] = p - learning_rates[k] * buffer
        return out

    return step


def adam(learning_rate: float, beta1: float, beta2: float, eps: float, moments: dict) -> Step:
    """torch.optim.Adam's update (bias-corrected); `moments` receives the final exp_avg_sq (detached)."""
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}

    def step(params: Parameters, grads: list[torch.Tensor], k: int) -> Parameters:
        out = {}
        t = k + 1
        for (name, p), g in zip(params.items(), grads):
            m[name] = beta1 * m.get(name, torch.zeros_like(g)) + (1 - beta1) * g
            v[name] = beta2 * v.get(name, torch.zeros_like(g)) + (1 - beta2) * g * g
            m_hat, v_hat = m[name] / (1 - beta1**t), v[name] / (1 - beta2**t)
            out[name] = p - learning_rate * m_hat / (v_hat.sqrt() + eps)
            moments[name] = v[name].detach().clone()
        return out

    return step


def train(
    model: nn.Module,
    start: Parameters,
    stages: list[tuple[torch.Tensor, torch.Tensor, int]],
    step: Step,
    weights: list[torch.Tensor | None],
    every: int,
    loss=squared_loss,
) -> tuple[Parameters, list[Parameters]]:
    """Full-batch training through `stages` [(inputs, targets, steps)], each with per-example weights
    (1 + ε) on its mean loss (None: all 1); keeps a graph to the weights. Checkpoints every `every` steps."""
    params = {name: p.detach().clone().requires_grad_(True) for name, p in start.items()}
    checkpoints, k = [], 0
    for (inputs, targets, steps), eps in zip(stages, weights):
        for _ in range(steps):
            losses = loss(functional_call(model, params, (inputs,)), targets)
            objective = ((1 + eps) * losses).mean() if eps is not None else losses.mean()
            grads = torch.autograd.grad(objective, list(params.values()), create_graph=True)
            params = step(params, list(grads), k)
            k += 1
            if k % every == 0:
                checkpoints.append({name: p.detach().clone() for name, p in params.items()})
    return params, checkpoints


def removal_effect(
    model: nn.Module,
    final: Parameters,
    eps: torch.Tensor,
    queries: tuple[torch.Tensor, torch.Tensor],
    loss=squared_loss,
) -> np.ndarray:
    """(Q, N): −d L_q(θ_T)/dε_i by autograd through the loop: the first-order change of each query's loss
    when example i is removed (ε_i = −1). Source's score / N predicts it (positive = supports)."""
    inputs, targets = queries
    query_losses = loss(functional_call(model, final, (inputs,)), targets)
    basis = torch.eye(len(inputs), dtype=query_losses.dtype)
    (derivative,) = torch.autograd.grad(query_losses, eps, grad_outputs=basis, is_grads_batched=True)
    return -derivative.numpy()


def mean_correlation(predicted: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) between predicted and exact effects over training examples, averaged over queries."""

    def ranks(values: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(values)).astype(float)

    pearson = [np.corrcoef(p, e)[0, 1] for p, e in zip(predicted, exact)]
    spearman = [np.corrcoef(ranks(p), ranks(e))[0, 1] for p, e in zip(predicted, exact)]
    return float(np.mean(pearson)), float(np.mean(spearman))
