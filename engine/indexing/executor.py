"""Where shards run: in this process, or on a Ray actor pool when the config has a `cluster` section."""

from __future__ import annotations

from collections.abc import Iterator

from engine.config import JobConfig
from engine.indexing.worker import ShardWorker


class LocalExecutor:
    def __init__(self, config: JobConfig):
        self.worker = ShardWorker(config)

    def describe(self) -> dict:
        return self.worker.describe()

    def run(self, stage: str, shards: list[int]) -> Iterator[dict]:
        for shard in shards:
            yield getattr(self.worker, stage)(shard)

    def reset(self) -> None:
        self.worker.reset()

    def shutdown(self) -> None:
        pass


def make_executor(config: JobConfig):
    if config.cluster is None:
        return LocalExecutor(config)
    from engine.distributed.cluster import connect, pool_size
    from engine.distributed.pool import RayExecutor

    connect(config.cluster)
    return RayExecutor(config, config.cluster, pool_size(config.cluster))
