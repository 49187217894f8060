"""Content fingerprints of a model's tracked weights + config and of a tokenizer."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from engine.model.placement import parameter_values


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def model_fingerprint(model: nn.Module, modules: dict[str, nn.Module], config=None) -> str:
    """`config`: the model config to hash in place of model.config (the one its saved weights load back with)."""
    digest = hashlib.sha256()
    config = config if config is not None else getattr(model, "config", None)
    if config is not None:
        raw = config.to_dict()
        for volatile in (
            "_name_or_path",
            "transformers_version",
            "_attn_implementation",
            "attn_implementation",
            "_attn_implementation_autoset",
        ):
            raw.pop(volatile, None)
        digest.update(json.dumps(raw, sort_keys=True, default=str).encode())
    for name, module in modules.items():
        digest.update(name.encode())
        for param_name, param in sorted(parameter_values(module), key=lambda item: item[0]):
            digest.update(param_name.encode())
            digest.update(str(param.dtype).encode())
            digest.update(_tensor_bytes(param))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    raw = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
