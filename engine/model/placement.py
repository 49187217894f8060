"""Where a replica's weights live: checks of the placement section, and accelerate's device_map loading.

A `device_map` replica is one process whose modules accelerate has spread over devices: each module's
AlignDevicesHook moves its inputs (and, for offloaded modules, its weights from CPU or disk) to its execution
device when it runs, and puts offloaded weights back on the meta device after. Everything here reads a
module's device and weights through those hooks, so the rest of the engine sees one model.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from engine.config import JobConfig, PlacementConfig
from engine.errors import TributaryError

Adapted = TypeVar("Adapted", bound=nn.Module)


def check_placement(config: JobConfig, gpus: int | None = None, count_devices: bool = True) -> None:
    """Refuse a placement this machine (or a cluster whose largest node has `gpus` GPUs) cannot run, before
    anything is written or any worker starts; `count_devices` False leaves the device count to a later check
    (the cluster's, once connected)."""
    placement = config.placement
    if placement.kind == "device_map" and count_devices:
        available = torch.cuda.device_count() if gpus is None else gpus
        if placement.devices_per_replica > max(available, 1):
            where = f"{available} GPU(s)" if available else "no GPU (the CPU counts as one device)"
            raise TributaryError(
                f"placement.devices_per_replica is {placement.devices_per_replica} but a node here has {where}; "
                f"set placement.devices_per_replica to at most {max(available, 1)}"
            )
    if placement.kind == "device_map" and placement.offload not in (None, "cpu"):
        _check_offload_directory(placement.offload)
    if placement.kind == "zero3":
        if not torch.distributed.is_available():
            raise TributaryError(
                "placement.kind zero3 needs torch.distributed, which this torch build lacks; install a torch with "
                "distributed support or use placement.kind device_map"
            )
        if importlib.util.find_spec("deepspeed") is None:  # not imported: its import costs seconds and warns
            raise TributaryError(
                "placement.kind zero3 needs DeepSpeed (pip install deepspeed); or use placement.kind device_map"
            )


def _check_offload_directory(offload: str) -> None:
    """The offload directory, or the nearest existing folder above it, must be a writable directory."""
    path = Path(offload)
    if path.exists() and not path.is_dir():
        raise TributaryError(f"placement.offload {offload} is a file, not a directory; give a directory for offload")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TributaryError(
            f"placement.offload {offload} is not writable (at {existing}); give a writable directory on a local disk"
        )


def device_map_arguments(placement: PlacementConfig) -> dict:
    """from_pretrained's device_map, max_memory and offload_folder for a device_map replica.

    `auto` fills GPUs 0..devices_per_replica-1 (up to `placement.max_memory` each, else their free memory), then
    the CPU when `offload` is cpu or a directory, then that directory. On a CPU-only machine the CPU is the
    execution device and only `max_memory: {cpu: ...}` below the model's size sends layers to disk.
    """
    limits = {str(key): value for key, value in (placement.max_memory or {}).items()}
    max_memory: dict[int | str, int | str] = {}
    for gpu in range(min(placement.devices_per_replica, torch.cuda.device_count())):
        if str(gpu) in limits:
            max_memory[gpu] = limits[str(gpu)]
        else:
            free, _ = torch.cuda.mem_get_info(gpu)
            max_memory[gpu] = int(free * 0.9)
    if placement.offload is not None or not torch.cuda.is_available():
        cpu = limits.get("cpu")
        if cpu is None:
            import psutil

            cpu = int(psutil.virtual_memory().available * 0.8)
        max_memory["cpu"] = cpu
    arguments: dict = {"device_map": "auto", "max_memory": max_memory}
    if placement.offload not in (None, "cpu"):
        arguments["offload_folder"] = str(placement.offload)
    return arguments


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else where its weights are."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return default


def input_device(model: nn.Module) -> torch.device:
    """Where a batch goes: the input embeddings' execution device (the model's first parameter's otherwise)."""
    default = next(model.parameters()).device
    embeddings = getattr(model, "get_input_embeddings", None)
    if embeddings is None:
        return default
    return execution_device(embeddings(), default if default.type != "meta" else torch.device("cpu"))


def parameter_values(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) of a module's own parameters, offloaded ones read from accelerate's weights map."""
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
    for name, parameter in module.named_parameters(recurse=False):
        if parameter.device.type == "meta" and weights is not None:
            yield name, weights[name]
        else:
            yield name, parameter


def resident_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds in memory (not on the meta device: offloaded to disk or
    partitioned away); a ZeRO-3 parameter counts its local partition."""
    total = 0
    for parameter in model.parameters():
        partition = getattr(parameter, "ds_tensor", None)
        if partition is not None:
            total += partition.numel() * partition.element_size()
        elif parameter.device.type != "meta":
            total += parameter.numel() * parameter.element_size()
    return total


def attach_adapter_to_dispatched(model: nn.Module, adapter: str, attach: Callable[[nn.Module], Adapted]) -> Adapted:
    """`attach(model)` (peft's adapter at `adapter`) on a model accelerate dispatched with offload.

    peft re-dispatches a model whose device map holds cpu or disk, which fails for the weights transformers
    left on the meta device; so the map is hidden while `attach` wraps the model. The adapter's own weights in
    offloaded layers are then still on meta (loading into them was a no-op): they are materialised on their
    layer's execution device and loaded from the adapter file again.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    device_map = model.__dict__.pop("hf_device_map", None)
    try:
        with warnings.catch_warnings():  # torch: loading into a meta parameter is a no-op, which is dealt with below
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            adapted = attach(model)
    finally:
        if device_map is not None:
            model.hf_device_map = device_map
    materialised = False
    for layer in adapted.modules():
        base = getattr(layer, "base_layer", None)
        if base is None:
            continue
        device = execution_device(base, torch.device("cpu"))
        for child_name, child in layer.named_modules():
            if child_name.startswith("lora_") and any(p.device.type == "meta" for p in child.parameters()):
                child.to_empty(device=device)
                materialised = True
    if materialised:
        result = set_peft_model_state_dict(adapted, load_peft_weights(adapter))
        if result.unexpected_keys:
            raise TributaryError(
                f"model.adapter {adapter}: weights {result.unexpected_keys[:3]} do not fit the dispatched model; "
                "use the adapter's own base model"
            )
    return adapted
