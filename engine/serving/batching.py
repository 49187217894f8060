"""The pass queue: requests wait while a scoring pass runs, and the next pass takes all of them.

Ray Serve's `@serve.batch` forms the next batch as soon as requests arrive (after its short wait) and
queues it behind the running one, so under steady load every pass stays small: with 32 clients its passes
answered about 4 requests each (benchmarks/results/serving_with_serve_batch.json). Here a batch is formed
only when the scorer is free, so every request that arrived during a pass joins the next one (up to
`max_size` queries; the rest wait for the pass after). After an idle spell the first request waits
`wait_s` for company.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class PassQueue(Generic[Item, Outcome]):
    """`await submit(item)` returns `run(batch)[i]` for the item; `run` runs in a worker thread, one at a time."""

    def __init__(
        self, run: Callable[[list[Item]], list[Outcome]], size: Callable[[Item], int], max_size: int, wait_s: float
    ):
        self.run = run
        self.size = size
        self.max_size = max_size
        self.wait_s = wait_s
        self._pending: deque[tuple[Item, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Outcome:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._arrival().set()
        return await future  # a caller that gives up (timeout) cancels the future; no pass will score it

    def _arrival(self) -> asyncio.Event:
        """The event `submit` sets, created with the worker (inside the running loop)."""
        if self._arrived is None:
            raise RuntimeError("the pass queue has no worker yet: submit() starts it")
        return self._arrived

    def _take(self) -> list[tuple[Item, asyncio.Future]]:
        """Waiting items in arrival order, up to max_size (always at least one), skipping abandoned ones."""
        batch, total = [], 0
        while self._pending:
            item, future = self._pending[0]
            if future.cancelled():
                self._pending.popleft()
                continue
            if batch and total + self.size(item) > self.max_size:
                break
            self._pending.popleft()
            batch.append((item, future))
            total += self.size(item)
        return batch

    async def _serve(self) -> None:
        while True:
            if not self._pending:
                self._arrival().clear()
                await self._arrival().wait()
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not batch:
                continue
            try:
                outcomes = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as error:  # the pass failed: every request in it hears why; the queue goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), outcome in zip(batch, outcomes):
                if not future.done():
                    future.set_result(outcome)
