"""Capture under DeepSpeed ZeRO-3: each rank holds 1/world of every parameter. The capture hooks need no
weights (a tracked module's inputs and output gradients are full on every rank), so only what reads the weights
themselves, the fingerprint and the saved boundaries, gathers them, on every rank at once (a collective)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from engine.config import JobConfig
from engine.curvature.factors import NEEDS_COVARIANCE
from engine.errors import TributaryError


def is_partitioned(model: nn.Module) -> bool:
    """ZeRO-3 marks every parameter it partitions with ds_id."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every parameter whole on this rank inside the block (each rank must enter it: the gather is collective)."""
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def loading_whole() -> Iterator[None]:
    """Models loaded inside the block are not partitioned, even while a ZeRO-3 training (the Trainer's) keeps
    transformers' DeepSpeed config alive: rank 0 alone loads a saved boundary back, and a partitioned load would
    start collectives that the other ranks never join."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # pyright: ignore[reportPrivateUsage]
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live


def check_partitioned_capture(config: JobConfig) -> None:
    """What capture does not do on ZeRO-3 partitioned parameters, refused in one line each."""
    if config.curvature.strategy in NEEDS_COVARIANCE and config.curvature.fisher is True:
        raise TributaryError(
            "curvature.fisher true is not captured under DeepSpeed ZeRO-3: its sampled-label backward, nested in the "
            "training backward, sets off ZeRO-3's backward hooks, which re-partition weights the training backward "
            "still needs; use fisher empirical, or index saved checkpoints with placement.kind zero3"
        )
