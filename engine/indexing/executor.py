"""Where shards run: what the driver needs of an executor, and the one that runs them in this process.

A config with a `cluster` section runs them on a Ray actor pool instead; engine.local_or_ray hands that executor in
(indexing does not import engine.distributed, which sits above it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from engine.config import JobConfig
from engine.errors import TributaryError
from engine.indexing.worker import ShardWorker


class ShardExecutor(Protocol):
    def describe(self) -> dict:
        """The workers' facts: projection spec, fingerprints, node, pid."""
        ...

    def run(self, stage: str, shards: list[int]) -> Iterator[dict]:
        """A receipt per finished shard of `stage`, in completion order."""
        ...

    def reset(self) -> None: ...

    def shutdown(self) -> None: ...


ExecutorFactory = Callable[[JobConfig], ShardExecutor]


class LocalExecutor:
    """The shards run in this process, in the order given, on `worker` (a ShardWorker of `config` when None; the
    exact path hands in its ExactWorker, a service its replica's, which keep their loaded model)."""

    def __init__(self, config: JobConfig | None = None, worker: ShardWorker | None = None):
        if worker is None:
            if config is None:
                raise ValueError("LocalExecutor needs a config or a worker")
            worker = ShardWorker(config)
        self.worker = worker

    def describe(self) -> dict:
        return self.worker.describe()

    def run(self, stage: str, shards: list[int]) -> Iterator[dict]:
        for shard in shards:
            yield getattr(self.worker, stage)(shard)

    def reset(self) -> None:
        self.worker.reset()

    def shutdown(self) -> None:
        pass


def in_process(config: JobConfig) -> LocalExecutor:
    """The executor of a config without a `cluster` section."""
    if config.cluster is not None:
        raise TributaryError(
            "the config has a `cluster` section, which this entry point does not start; index through "
            "engine.local_or_ray.run_index (as `tributary index` does), or drop the cluster section"
        )
    return LocalExecutor(config)
