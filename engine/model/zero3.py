"""Load a causal LM partitioned over the ranks of a torch.distributed group with DeepSpeed ZeRO-3, for inference.

Each rank holds 1/world of every parameter (its `ds_tensor`); a module's full weight is all-gathered just before
its forward (and backward) and released after. The all-gathers are collective: every rank of the group must run
the same sequence of forward/backward calls (engine.gradients.passes pads the ranks with fewer batches).

The group must already be initialised (engine.distributed.groups does it: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Any, cast

import torch
from torch import nn

from engine.config import ModelConfig, PlacementConfig
from engine.errors import TributaryError
from engine.model.loading import DTYPES, _attach_adapter, load_tokenizer

log = logging.getLogger(__name__)

# Kept alive for as long as the model: transformers reads the ZeRO-3 setting from this object while loading
# (from_pretrained builds the model inside deepspeed.zero.Init only while one exists).
_LIVE_CONFIGS: list[Any] = []


def zero3_config(dtype: torch.dtype) -> dict:
    """DeepSpeed's config for partitioned inference: every parameter partitioned (threshold 0), no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            # one parameter per gather: the coalesced gather (every partition gathered in place into one flat
            # buffer) left parameters uninitialised on gloo now and then (2 group starts in 8 on this machine)
            "stage3_allgather_sequential": True,
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "wall_clock_breakdown": False,
    }


def load_zero3_model(config: ModelConfig, placement: PlacementConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the model partitioned over the current torch.distributed group, frozen, eval mode,
    in placement.dtype (else model.dtype), with model.adapter attached (adapter_mode adapter: the config check
    refuses the others)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise TributaryError("placement.kind zero3: torch.distributed is not initialised in this worker")
    os.environ.setdefault("LOCAL_RANK", "0")
    # named, so DeepSpeed does not probe for accelerators and warn that it fell back to the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    dtype = DTYPES[placement.dtype or config.dtype]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ds_config = zero3_config(dtype)
    _LIVE_CONFIGS.append(HfDeepSpeedConfig(ds_config))
    previous = torch.get_default_dtype()
    # DeepSpeed's gathers call torch's renamed collective: a warning about DeepSpeed, not the user's setup
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's "op built successfully" line, once per rank
            model = AutoModelForCausalLM.from_pretrained(
                config.path, dtype=dtype, local_files_only=True, trust_remote_code=config.trust_remote_code
            )
    except (OSError, ValueError, RuntimeError) as error:
        raise TributaryError(f"model.path {config.path}: could not be loaded partitioned ({error})") from None
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    # the plain module: the engine's own __call__ adds a backward hook that breaks autograd.grad w.r.t. outputs
    model = cast(nn.Module, engine.module)
    _force_dtype(model, dtype)
    if config.adapter is not None:
        model = _attach_adapter(model, config.adapter, config.path)
        for param in model.parameters():  # the adapter's own small weights, not partitioned, to this rank's device
            if not hasattr(param, "ds_id"):
                param.data = param.data.to(device)
    model.requires_grad_(False)
    model.eval()
    return model, load_tokenizer(config.tokenizer or config.path, config.trust_remote_code)


def _force_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed on CPU leaves the partitions in bfloat16 when neither bf16 nor fp16 is enabled: cast them back
    (and the not-partitioned buffers) to the configured dtype."""
    for param in model.parameters():
        partition = getattr(param, "ds_tensor", None)
        if partition is not None and partition.dtype != dtype:
            partition.data = partition.data.to(dtype)
        if param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype and "inv_freq" not in name:
                setattr(module, name, buffer.to(dtype))


def partition_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: the sum of its ZeRO-3 partitions (a parameter not partitioned counts
    whole)."""
    total = 0
    for param in model.parameters():
        held = getattr(param, "ds_tensor", param)
        total += held.numel() * held.element_size()
    return total


def full_bytes(model: nn.Module) -> int:
    """Bytes of the whole model's parameters (their full shapes, as if not partitioned)."""
    total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel * param.element_size()
    return total
