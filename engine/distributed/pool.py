"""Run shards of a stage on an actor pool, re-issuing a shard whose actor died.

The pool is generic: it runs any worker class that is built as `worker(*arguments, threads=n)` and answers
`describe()`, `ping()`, `reset()` and one method per stage taking a shard number (indexing's ShardWorker;
engine.local_or_ray hands it in).

Actors restart after a crash (max_restarts), and a shard whose call failed because its actor died
is put back in the queue and handed to the next free actor. Results arrive as receipts; the driver
commits each shard once, whatever number of attempts it took.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator

from engine.config import ClusterConfig
from engine.errors import TributaryError

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4
RECOVERY_PINGS = 240
RECOVERY_WAIT_S = 0.25


class RayExecutor:
    def __init__(
        self, worker: type, arguments: tuple, cluster: ClusterConfig, size: int, gpus_per_actor: float | None = None
    ):
        """`gpus_per_actor` (default cluster.gpus_per_worker): GPUs each actor reserves where the cluster has any
        (a device_map replica reserves all of its devices)."""
        import ray
        import ray.exceptions  # self._ray.exceptions below: `import ray` alone does not declare the submodule

        from engine.distributed.cluster import forwarded_environment

        actor_class = ray.remote(worker).options(
            num_cpus=cluster.cpus_per_worker,
            num_gpus=(cluster.gpus_per_worker if gpus_per_actor is None else gpus_per_actor) if _has_gpus() else 0,
            max_restarts=MAX_ATTEMPTS,
            max_task_retries=0,
            runtime_env={"env_vars": forwarded_environment()},
        )
        self.actors = [actor_class.remote(*arguments, threads=cluster.cpus_per_worker) for _ in range(size)]
        self._ray = ray
        self._recoveries: dict[int, int] = {}

    def describe(self) -> dict:
        try:
            return self._ray.get(self.actors[0].describe.remote())
        except self._ray.exceptions.RayActorError as error:
            cause = error.__cause__ or error
            if isinstance(cause, TributaryError):
                raise cause from None
            raise TributaryError(f"a worker could not start: {cause}") from None

    def run(self, stage: str, shards: list[int]) -> Iterator[dict]:
        """Receipts of finished shards, in completion order; a shard whose actor died is re-queued."""
        ray = self._ray
        queue = deque(shards)
        attempts = {shard: 0 for shard in shards}
        in_flight: dict = {}  # ref -> (actor, shard), shard None for a readiness ping
        idle = deque(self.actors)
        while queue or any(shard is not None for _, shard in in_flight.values()):
            while queue and idle:
                actor, shard = idle.popleft(), queue.popleft()
                attempts[shard] += 1
                in_flight[getattr(actor, stage).remote(shard)] = (actor, shard)
            if not in_flight:
                raise TributaryError(f"{stage}: every worker is gone; check the cluster and run again to resume")
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, shard = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise _unwrapped(error) from None
            except ray.exceptions.RayActorError as error:
                self._recover(actor, in_flight)
                if shard is None:
                    continue
                if attempts[shard] >= MAX_ATTEMPTS:
                    raise TributaryError(f"{stage} shard {shard} failed {attempts[shard]} times: {error}") from None
                log.warning("%s shard %d: its worker died (%s); re-issuing it", stage, shard, type(error).__name__)
                queue.append(shard)
                continue
            idle.append(actor)
            if shard is not None:
                yield result

    def _recover(self, actor, in_flight: dict) -> None:
        """Ask a failed actor for its pid until it answers (it is restarting); then it takes work again."""
        attempts = self._recoveries.get(id(actor), 0) + 1
        self._recoveries[id(actor)] = attempts
        if attempts > RECOVERY_PINGS:
            log.warning("a worker did not come back after %d checks; continuing without it", RECOVERY_PINGS)
            return
        time.sleep(RECOVERY_WAIT_S)
        in_flight[actor.ping.remote()] = (actor, None)

    def reset(self) -> None:
        """Drop cached store state before a new stage (a restarted actor starts fresh anyway)."""
        for actor in self.actors:
            try:
                self._ray.get(actor.reset.remote())
            except self._ray.exceptions.RayActorError:
                pass

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)  # pyright: ignore[reportArgumentType] - ray types .remote() as handle | class


def _unwrapped(error: Exception) -> Exception:
    """A worker's TributaryError as the user should see it (one line, its own message), not Ray's wrapper with
    the remote traceback; any other failure stays as Ray raised it."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, TributaryError):
        return TributaryError(str(cause))
    return error


def largest_node_gpus() -> int:
    """GPUs of the connected cluster's largest node (0 on a CPU-only cluster)."""
    import ray

    return int(max((node.get("Resources", {}).get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0))


def _has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
