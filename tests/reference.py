"""Independent reference computations for tests: brute-force autograd, one example at a time."""

from __future__ import annotations

import torch

from engine.capture.loss import per_example_loss
from engine.capture.modules import TrackedKind
from engine.data.batching import collate


def autograd_per_example(
    model, modules: dict, tokenized_rows, pad_id: int, include_bias: bool = True, labels_override=None
) -> torch.Tensor:
    """(N, D) gradients in the store layout: per module the d_out x (d_in [+1 bias]) gradient, row-major.

    Each example runs alone (no padding) and `torch.autograd.grad` differentiates its summed loss
    with respect to the tracked modules' weights directly.
    """
    params = []
    for module in modules.values():
        params.append(module.weight)
        if include_bias and module.bias is not None:
            params.append(module.bias)
    for param in params:
        param.requires_grad_(True)
    rows = []
    try:
        for i, row in enumerate(tokenized_rows):
            batch = collate([row], pad_id)
            labels = batch.labels if labels_override is None else labels_override[i]
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            loss = per_example_loss(logits, labels).sum()
            grads = dict(zip([id(p) for p in params], torch.autograd.grad(loss, params)))
            pieces = []
            for module in modules.values():
                kind = TrackedKind.for_module(module)
                assert kind is not None, f"{type(module).__name__} is not a tracked kind"
                weight_grad = grads[id(module.weight)]
                weight_grad = weight_grad.t() if kind.weight_as_out_in(module) is not module.weight else weight_grad
                if include_bias and module.bias is not None:
                    weight_grad = torch.cat([weight_grad, grads[id(module.bias)][:, None]], dim=1)
                pieces.append(weight_grad.flatten())
            rows.append(torch.cat(pieces))
    finally:
        for param in params:
            param.requires_grad_(False)
    return torch.stack(rows)


def _reference_targets(model, names) -> list[tuple]:
    """Per tracked name: (weight parameter, expert index or None, weight stored (in, out), bias parameter or None),
    read from the model's own parameters: a fused experts module's `<experts>.gate_up.<e>` is slice e of its 3-D
    `gate_up_proj` (`up`, `down` likewise), never through Tributary's expert slices."""
    fused_names = {"gate_up": "gate_up_proj", "up": "up_proj", "down": "down_proj"}
    targets = []
    for name in names:
        parent, _, last = name.rpartition(".")
        owner, _, projection = parent.rpartition(".")
        if last.isdigit() and projection in fused_names:
            experts = model.get_submodule(owner)
            fused = getattr(experts, fused_names[projection])
            bias = getattr(experts, fused_names[projection] + "_bias", None)
            targets.append((fused, int(last), bool(getattr(experts, "is_transposed", False)), bias))
            continue
        module = model.get_submodule(name)
        transposed = type(module).__name__ == "Conv1D"
        targets.append((module.weight, None, transposed, getattr(module, "bias", None)))
    return targets


def autograd_per_example_of_parameters(model, names, tokenized_rows, pad_id: int, include_bias: bool = True):
    """(N, D) per-example gradients in the store layout for tracked `names`, by autograd of each example's summed
    loss with respect to the model's parameters (3-D expert parameters whole, then sliced per expert)."""
    targets = _reference_targets(model, names)
    params = {id(p): p for weight, _, _, bias in targets for p in (weight, bias) if p is not None}
    for param in params.values():
        param.requires_grad_(True)
    rows = []
    try:
        for row in tokenized_rows:
            batch = collate([row], pad_id)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            loss = per_example_loss(logits, batch.labels).sum()
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
            pieces = []
            for weight, expert, transposed, bias in targets:
                weight_grad = grads[id(weight)]
                weight_grad = torch.zeros_like(weight) if weight_grad is None else weight_grad
                bias_grad = None
                if include_bias and bias is not None:
                    bias_grad = grads[id(bias)]
                    bias_grad = torch.zeros_like(bias) if bias_grad is None else bias_grad
                if expert is not None:
                    weight_grad = weight_grad[expert]
                    bias_grad = None if bias_grad is None else bias_grad[expert]
                weight_grad = weight_grad.t() if transposed else weight_grad
                if bias_grad is not None:
                    weight_grad = torch.cat([weight_grad, bias_grad[:, None]], dim=1)
                pieces.append(weight_grad.flatten())
            rows.append(torch.cat(pieces))
    finally:
        for param in params.values():
            param.requires_grad_(False)
    return torch.stack(rows)
