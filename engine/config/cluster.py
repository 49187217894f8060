"""cluster: the Ray cluster a job runs on."""

from __future__ import annotations

from pydantic import Field

from engine.config.section import Section as _Section


class ClusterConfig(_Section):
    address: str = Field(
        default="local", description="local (start Ray here), auto (join the running cluster) or HOST:PORT"
    )
    workers: int | None = Field(
        default=None, gt=0, description="actors; default one per GPU, or CPUs / cpus_per_worker"
    )
    gpus_per_worker: float = Field(default=1, ge=0, description="GPUs per actor (ignored on CPU-only clusters)")
    cpus_per_worker: int = Field(default=1, gt=0, description="CPUs per actor, also its torch thread count")
    local_cpus: int | None = Field(default=None, gt=0, description="address local: CPUs Ray may use (default: all)")
    node_ip_address: str | None = Field(
        default=None, description="address the driver's node binds; address local: loopback 127.0.0.1 unless set"
    )
    dashboard: bool = Field(default=False, description="address local: start Ray's dashboard (on 127.0.0.1:8265)")
