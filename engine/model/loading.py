"""Load a causal LM and its tokenizer from local files only, frozen and in eval mode."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from engine.errors import TributaryError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Projections and statistics run in float64 for float64 models and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TributaryError(f"model.path {path}: no tokenizer could be loaded ({error})") from None


def checked_tokenizer(path: str):
    """The tokenizer of model.path, with a clear error when the path does not exist."""
    if not Path(path).exists():
        raise TributaryError(
            f"model.path {path} does not exist; give a local HF model directory "
            "(models are never downloaded at run time)"
        )
    if not (Path(path) / "config.json").is_file():
        raise TributaryError(f"model.path {path} is not an HF model directory (it has no config.json)")
    return load_tokenizer(path)


def load_model(config: ModelConfig, device: torch.device | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer); weights frozen, eval mode.

    The model's own attention implementation is kept (SDPA by default): no vmap is used, and
    transformers' eager attention produces NaN for left-padded float64 batches.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    device = device or default_device()
    path = config.path
    if not Path(path).exists():
        raise TributaryError(
            f"model.path {path} does not exist; give a local HF model directory "
            "(models are never downloaded at run time)"
        )
    try:
        model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TributaryError(f"model.path {path} is not an HF model directory: {error}") from None
    model = AutoModelForCausalLM.from_pretrained(path, config=model_config, dtype=DTYPES[config.dtype],
                                                 local_files_only=True)
    if config.adapter is not None:
        model = _attach_adapter(model, config.adapter)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return model, load_tokenizer(path)


def _attach_adapter(model: nn.Module, adapter: str) -> nn.Module:
    from peft import PeftModel

    if not Path(adapter).is_dir():
        raise TributaryError(f"model.adapter {adapter} is not a directory; give a peft adapter directory")
    return PeftModel.from_pretrained(model, adapter, is_trainable=False)
