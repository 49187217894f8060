"""Run shards of a stage on an actor pool, re-issuing a shard whose actor died, or whose node was lost.

The pool is generic: it runs any worker class that is built as `worker(*arguments, threads=n)` and answers
`describe()`, `ping()`, `reset()` and one method per stage taking a shard number (indexing's ShardWorker;
engine.local_or_ray hands it in).

Actors restart after a crash (max_restarts), and a shard whose call failed because its actor died is put
back in the queue and handed to the next free actor. An actor that failed takes work again only once it
answers a ping: one whose node was lost restarts wherever Ray finds room, which may be nowhere until a node
joins, and until then the others do its shards. Results arrive as receipts; the driver commits each shard
once, whatever number of attempts it took. With cluster.min_nodes, a lost node that leaves fewer alive nodes
waits for a replacement or stops the run (engine.distributed.nodes).

How soon a lost node is noticed is Ray's (LOST_NODE_NOTICE_S); the driver re-issues a shard as soon as its
call fails.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from engine.config import ClusterConfig
from engine.distributed.nodes import require_nodes
from engine.errors import TributaryError

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4
RECOVERY_PINGS = 240  # failed pings (0.25 s apart) before an actor that keeps dying is given up
RECOVERY_WAIT_S = 0.25
# An actor Ray calls unavailable is restarting, perhaps waiting for room on a node yet to join: it is asked
# again every second for as long as the run lasts, so a replacement node's actor takes work within a second.
UNAVAILABLE_PING_S = 1.0
# A node whose processes are killed breaks its connections: Ray fails the calls in flight on its actors at once
# (ActorUnavailableError; measured 1.4-2.0 s from the kill, with Ray's default health checks as with faster
# ones). A machine that vanishes without closing them (power, network) is declared dead by the GCS after
# health_check_failure_threshold missed checks health_check_period_ms apart (Ray 2.60: 5 x 3 s), the last one
# waiting up to its timeout: about 20-30 s. This is the bound README states for noticing a lost node.
LOST_NODE_NOTICE_S = 30
# How long a pool with shards left and no actor answering waits for one to come back (a restarted actor
# loads the model before it answers its ping: minutes for a large model) before it stops, resumable.
WORKER_RETURN_S = 600
# With min_nodes, how often the alive nodes are counted during a stage: the call that failed for a lost node
# may come before the GCS declares it dead, and a node may go without any call failing.
NODE_CHECK_S = 1.0
RESET_WAIT_S = 60  # a reset drops cached state: seconds at most; an actor slower than that is treated as lost


class RayExecutor:
    def __init__(
        self, worker: type, arguments: tuple, cluster: ClusterConfig, size: int, gpus_per_actor: float | None = None
    ):
        """`gpus_per_actor` (default cluster.gpus_per_worker): GPUs each actor reserves where the cluster has any
        (a device_map replica reserves all of its devices)."""
        import ray
        import ray.exceptions  # self._ray.exceptions below: `import ray` alone does not declare the submodule

        from engine.distributed.cluster import forwarded_environment

        require_nodes(cluster, "starting the workers")
        actor_class = ray.remote(worker).options(
            num_cpus=cluster.cpus_per_worker,
            num_gpus=(cluster.gpus_per_worker if gpus_per_actor is None else gpus_per_actor) if _has_gpus() else 0,
            max_restarts=MAX_ATTEMPTS,
            max_task_retries=0,
            runtime_env={"env_vars": forwarded_environment()},
        )
        self.actors = [actor_class.remote(*arguments, threads=cluster.cpus_per_worker) for _ in range(size)]
        self.cluster = cluster
        self._ray = ray
        self._recoveries: dict[int, int] = {}
        self._answering = list(self.actors)  # the actors that take work; a failed one rejoins when it answers
        self._pings: dict = {}  # ref -> a failed actor, asked whether it is back
        self._resting: list[tuple[float, Any]] = []  # (when to ask again, failed actor)

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
        in_flight: dict = {}  # ref -> (actor, shard)
        idle = deque(self._answering)
        idle_since = time.monotonic()
        next_node_check = time.monotonic() + NODE_CHECK_S
        while queue or in_flight:
            self._ping_due()
            if self.cluster.min_nodes is not None and time.monotonic() >= next_node_check:
                self._replace(stage, idle, lost_worker=False)  # a node lost without a call failing
                next_node_check = time.monotonic() + NODE_CHECK_S
            while queue and idle:
                actor, shard = idle.popleft(), queue.popleft()
                attempts[shard] += 1
                in_flight[getattr(actor, stage).remote(shard)] = (actor, shard)
            if not in_flight and not self._pings and not self._resting:
                raise TributaryError(f"{stage}: every worker is gone; check the cluster and run again to resume")
            if in_flight:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > WORKER_RETURN_S:
                raise TributaryError(
                    f"{stage}: no worker answered for {WORKER_RETURN_S} s ({len(queue)} shards left); check the "
                    "cluster and run again to resume"
                )
            waiting = [*in_flight, *self._pings]
            if not waiting:  # only actors resting before their next ping
                time.sleep(RECOVERY_WAIT_S)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=RECOVERY_WAIT_S)
            if not ready:
                continue
            (ref,) = ready
            if ref in self._pings:
                actor = self._pings.pop(ref)
                if self._answered(actor, ref):
                    idle.append(actor)
                continue
            actor, shard = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise _unwrapped(error) from None
            except ray.exceptions.RayActorError as error:
                if attempts[shard] >= MAX_ATTEMPTS:
                    raise TributaryError(f"{stage} shard {shard} failed {attempts[shard]} times: {error}") from None
                log.warning("%s shard %d: its worker died (%s); re-issuing it", stage, shard, type(error).__name__)
                queue.append(shard)
                self._lost(actor)
                self._replace(stage, idle, lost_worker=True)
                continue
            idle.append(actor)
            yield result

    def _lost(self, actor) -> None:
        """A failed actor takes no work until it answers a ping (it is restarting, maybe on a node yet to come)."""
        if actor in self._answering:
            self._answering.remove(actor)
        self._pings[actor.ping.remote()] = actor

    def _replace(self, stage: str, idle: deque, lost_worker: bool) -> None:
        """With cluster.min_nodes: wait for enough nodes (engine.distributed.nodes); then, when that took a new
        node or a worker was just lost, for the lost actors to restart and answer, so a replacement node shares
        the work from here on. Each wait is at most cluster.node_wait_s (a node the GCS had not yet declared
        dead when its worker's call failed is counted at the next check: two waits at most)."""
        if self.cluster.min_nodes is None:
            return
        started = time.monotonic()
        if not require_nodes(self.cluster, stage) and not lost_worker:
            return
        deadline = started + self.cluster.node_wait_s
        while len(self._answering) < len(self.actors) and time.monotonic() < deadline:
            self._ping_due()
            if not self._pings:
                time.sleep(RECOVERY_WAIT_S)
                continue
            ready, _ = self._ray.wait(list(self._pings), num_returns=1, timeout=RECOVERY_WAIT_S)
            for ref in ready:
                actor = self._pings.pop(ref)
                if self._answered(actor, ref):
                    idle.append(actor)
        log.warning("%s: %d of %d workers answering; going on", stage, len(self._answering), len(self.actors))

    def _ping_due(self) -> None:
        now = time.monotonic()
        due = [actor for at, actor in self._resting if at <= now]
        self._resting = [(at, actor) for at, actor in self._resting if at > now]
        for actor in due:
            self._pings[actor.ping.remote()] = actor

    def _answered(self, actor, ref) -> bool:
        """Whether a pinged actor is back (then it takes work again); otherwise it is asked again later."""
        ray = self._ray
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            self._resting.append((time.monotonic() + UNAVAILABLE_PING_S, actor))
            return False
        except ray.exceptions.RayActorError:
            attempts = self._recoveries.get(id(actor), 0) + 1
            self._recoveries[id(actor)] = attempts
            if attempts > RECOVERY_PINGS:
                log.warning("a worker did not come back after %d checks; continuing without it", RECOVERY_PINGS)
            else:
                self._resting.append((time.monotonic() + RECOVERY_WAIT_S, actor))
            return False
        self._answering.append(actor)
        return True

    def reset(self) -> None:
        """Drop cached store state before a new stage (a restarted actor starts fresh anyway); an actor that does
        not answer in RESET_WAIT_S is handled as lost."""
        ray = self._ray
        calls = {actor.reset.remote(): actor for actor in self._answering}
        if not calls:
            return
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=RESET_WAIT_S)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self._lost(calls[ref])
        for ref in late:
            self._lost(calls[ref])

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
