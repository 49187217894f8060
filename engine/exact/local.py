"""The exact stages' executor in this process: one ExactWorker, its shards run in the order given."""

from __future__ import annotations

from collections.abc import Iterator

from engine.exact.worker import ExactWorker


class InProcess:
    def __init__(self, worker: ExactWorker):
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
