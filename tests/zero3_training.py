"""What the ZeRO-3 training tests share: DeepSpeed's config for 2 gloo ranks on CPU, and the shm op left unbuilt."""

from __future__ import annotations


def zero3_config(micro_batch: int | str = 2) -> dict:
    """ZeRO-3 with the client's torch optimizer (zero_force_ds_cpu_optimizer off: no DeepSpeed CPU Adam to build),
    float32 (bf16 and fp16 off)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # every parameter partitioned, the small ones too
            "stage3_allgather_sequential": True,
        },
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "wall_clock_breakdown": False,
    }


def without_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory op (deepspeed_shm_comm, for its inference
    all-reduce only) at every process group it wraps; training uses torch.distributed's own collectives. The
    build takes minutes on 2 loaded cores and rewrites the shared torch_extensions cache, so it is skipped."""
    import importlib

    # by its module path: the package deepspeed.comm re-exports the torch library itself under the name torch
    setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)  # noqa: B010
