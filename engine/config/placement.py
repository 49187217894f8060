"""placement: how one replica holds the model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config.section import Section as _Section


class PlacementConfig(_Section):
    """How one replica (one copy of the model) is held: on one device, split across devices by accelerate, or
    partitioned over a group of ranks by DeepSpeed ZeRO-3."""

    kind: Literal["single", "device_map", "zero3"] = Field(
        default="single",
        description="single: the whole model on one device; device_map: accelerate spreads its layers over "
        "devices_per_replica GPUs (and CPU / disk with offload); zero3: a group of devices_per_replica Ray actors "
        "holds it partitioned with DeepSpeed ZeRO-3",
    )
    devices_per_replica: int = Field(
        default=1, gt=0, description="GPUs per replica; on a CPU-only machine, the ranks of a zero3 group"
    )
    offload: str | None = Field(
        default=None, description="device_map: null, cpu, or a directory for accelerate's disk offload"
    )
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = Field(
        default=None, description="compute dtype of the weights (default model.dtype); projections stay float32"
    )
    max_memory: dict[str, str | int] | None = Field(
        default=None,
        description="device_map: accelerate's memory cap per device, e.g. {0: 70GiB, cpu: 200GiB} (default: the "
        "free memory of each GPU, 80% of the available RAM); what does not fit goes to the next device, then disk",
    )
