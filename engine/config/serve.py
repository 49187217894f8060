"""serve: the HTTP service's address, batching, limits and auth."""

from __future__ import annotations

from pydantic import Field

from engine.config.section import Section as _Section


class ServeConfig(_Section):
    """`tributary serve`: where it listens, how it batches, what a request may ask, who may ask."""

    host: str = Field(default="127.0.0.1", description="address the HTTP proxy binds (loopback unless told otherwise)")
    port: int = Field(default=8000, gt=0, lt=65536)
    replicas: int = Field(default=1, gt=0, description="service replicas, each holding the model and the store handle")
    replica_cpus: float = Field(
        default=1, gt=0, description="CPUs per replica (also its torch thread count, at least 1)"
    )
    replica_gpus: float = Field(default=0, ge=0, description="GPUs per replica (query gradients and generation)")
    max_queries_per_request: int = Field(default=32, gt=0, description="more queries in one request: 413")
    max_prompt_chars: int = Field(default=8000, gt=0, description="a longer prompt or completion: 413")
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="a prompt with more tokens: 413; default data.max_length - 1"
    )
    max_new_tokens: int = Field(default=256, gt=0, description="generate.max_new_tokens above this: 413")
    max_top_k: int = Field(default=100, gt=0, description="top_k above this: 422")
    max_request_bytes: int = Field(default=1 << 20, gt=0, description="a larger request body: 413")
    request_timeout_s: float = Field(default=60, gt=0, description="a request not answered by then: 504")
    batch_max_queries: int = Field(default=64, gt=0, description="queries scored together in one pass of the store")
    batch_wait_s: float = Field(default=0.01, ge=0, description="how long a pass waits for more requests to join it")
    max_ongoing_requests: int = Field(
        default=256,
        gt=0,
        description="requests a replica holds at once (queued for a batch or being scored); more wait at the proxy",
    )
    auth_token_env: str | None = Field(
        default=None,
        description="name of the environment variable holding the bearer token (read on the replicas' nodes)",
    )
    auth_token_file: str | None = Field(
        default=None, description="file holding the bearer token (read on the replicas' nodes)"
    )
    approximate: bool = Field(
        default=False,
        description="rank single-term methods with the ANN index beside the store (`tributary ann build STORE`), "
        "re-scoring QueryOptions.rerank candidates exactly; other methods scan exactly",
    )
    rescore: int | None = Field(
        default=None,
        description="re-score each query's top-K and bottom-K store candidates with the exact streamed pass "
        "(as `tributary query --rescore K`; needs exact.factors for method if); null: the store's scores",
    )
