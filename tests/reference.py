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
