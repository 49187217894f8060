"""Capture under DeepSpeed ZeRO-3: each rank holds 1/world of every parameter. The capture hooks need no
weights (a tracked module's inputs and output gradients are full on every rank), so only what reads the weights
themselves, the fingerprint and the saved boundaries, gathers them, on every rank at once (a collective). The
true Fisher's re-forward (engine.capture.training) gathers through ZeRO-3's own hooks, and `zero3_release` hands
back what its data-only backward leaves gathered."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

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


def check_partitioned_capture(config: JobConfig, model: nn.Module) -> None:
    """What capture does not do on ZeRO-3 partitioned parameters, refused in one line each. The true Fisher's
    sampled-label gradients come from a second forward of each micro-batch there (TrainingHooks `reforward`),
    which gives the training forward's graph again only where the forward draws nothing at random."""
    if takes_true_fisher(config) and (dropout := active_dropout(model)):
        raise TributaryError(
            f"curvature.fisher true under DeepSpeed ZeRO-3 runs each micro-batch's forward a second time, which "
            f"dropout would change ({dropout}); set the model's dropout to 0, or use fisher empirical"
        )


def takes_true_fisher(config: JobConfig) -> bool:
    return config.curvature.strategy in NEEDS_COVARIANCE and config.curvature.fisher is True


def active_dropout(model: nn.Module) -> str | None:
    """A dropout the model's forward applies in training mode, named, or None: nn.Dropout modules with p > 0 and
    the attention dropout HF models read from their config (applied functionally, not as a module)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:  # pyright: ignore[reportPrivateUsage]
            return f"{name} p={module.p}"
    rate = getattr(getattr(model, "config", None), "attention_dropout", 0.0)
    if isinstance(rate, int | float) and rate > 0:
        return f"config.attention_dropout={rate}"
    return None


def zero3_release(*holders: Any) -> Callable[[], None] | None:
    """DeepSpeed's own release of every gathered ZeRO-3 parameter (`partition_all_parameters` of its offload
    manager, which its optimizer step runs first for modules whose backward never ran), found on a DeepSpeed
    engine or a ZeRO-3 optimizer, or one of them wrapped (`.optimizer`, accelerate's and the engine's); None
    where there is none."""
    for holder in holders:
        seen = 0
        while holder is not None and seen < 8:
            offload = getattr(holder, "parameter_offload", None)
            if offload is not None and callable(getattr(offload, "partition_all_parameters", None)):
                return offload.partition_all_parameters
            holder, seen = getattr(holder, "optimizer", None), seen + 1
    return None
