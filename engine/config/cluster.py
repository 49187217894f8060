"""cluster: the Ray cluster a job runs on."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

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
    min_nodes: int | None = Field(
        default=None,
        gt=0,
        description="alive Ray nodes (the head included) a run needs; with fewer it waits node_wait_s for a "
        "replacement, then stops, resumable (default: go on with whatever nodes remain)",
    )
    node_wait_s: float = Field(
        default=120, ge=0, description="with min_nodes: seconds to wait for a replacement node before stopping"
    )

    @model_validator(mode="after")
    def _node_options(self) -> ClusterConfig:
        if self.min_nodes is not None and self.min_nodes > 1 and self.address == "local":
            raise PydanticCustomError(
                "cluster_options",
                "address local is one node, so min_nodes above 1 can never be met; join a cluster "
                "(address: auto or HOST:PORT) or remove min_nodes",
            )
        if "node_wait_s" in self.model_fields_set and self.min_nodes is None:
            raise PydanticCustomError("cluster_options", "node_wait_s is for min_nodes; set min_nodes or remove it")
        return self
