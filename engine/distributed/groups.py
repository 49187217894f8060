"""Run shards of a stage on groups of Ray actors that each hold one model partitioned (placement.kind zero3).

A group is `world` actors, the ranks of one torch.distributed process group: rank 0 offers its node's IP and a
free port, every rank joins there and loads its partition. The ranks' collectives must line up, so a group
takes up to `world` shards at a time (one per rank; a rank without one runs padding only) and every rank runs
the same batch count. A rank that dies, or a collective that fails or times out, loses the whole group: its
actors are killed, a fresh group is built (on a new port) and its unfinished shards go back in the queue.

The executor is generic: the worker class is built as `worker(*arguments, threads=n)` and answers `address()`,
`join(rank, world, address, port) -> facts`, `batch_count(shards) -> int`, `reset()` and one method per
stage taking `(shard | None, batches)` (indexing's ZeroShardWorker; engine.local_or_ray hands it in).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.config import ClusterConfig
from engine.distributed.pool import _has_gpus, _unwrapped
from engine.errors import TributaryError

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4


@dataclass
class Group:
    actors: list
    facts: list[dict]
    shards: list[int] = field(default_factory=list)  # the step in flight
    pending: set = field(default_factory=set)  # its refs not yet answered
    receipts: list[dict] = field(default_factory=list)


class GroupExecutor:
    def __init__(self, worker: type, arguments: tuple, cluster: ClusterConfig, groups: int, world: int):
        import ray
        import ray.exceptions  # self._ray.exceptions below: `import ray` alone does not declare the submodule

        from engine.distributed.cluster import forwarded_environment

        self._ray = ray
        self.world = world
        self._arguments = arguments
        self._threads = cluster.cpus_per_worker
        self._actor_class = ray.remote(worker).options(
            num_cpus=cluster.cpus_per_worker,
            num_gpus=cluster.gpus_per_worker if _has_gpus() else 0,
            max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": forwarded_environment()},
        )
        self.groups = [self._start_group() for _ in range(groups)]

    def _start_group(self) -> Group:
        ray = self._ray
        actors = [self._actor_class.remote(*self._arguments, threads=self._threads) for _ in range(self.world)]
        try:
            address, port = ray.get(actors[0].address.remote())
            facts = ray.get([actor.join.remote(rank, self.world, address, port) for rank, actor in enumerate(actors)])
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
            for actor in actors:
                ray.kill(actor)  # pyright: ignore[reportArgumentType] - ray types .remote() as handle | class
            cause = getattr(error, "cause", None) or error.__cause__ or error
            if isinstance(cause, TributaryError):
                raise TributaryError(str(cause)) from None
            raise TributaryError(f"a zero3 group could not start: {cause}") from None
        if any(rank["fingerprints"] != facts[0]["fingerprints"] for rank in facts):
            for actor in actors:
                ray.kill(actor)  # pyright: ignore[reportArgumentType]
            raise TributaryError(
                "the ranks of a zero3 group gathered different weights of model.path (their fingerprints differ); "
                "use placement.kind single or device_map for this model"
            )
        return Group(actors, facts)

    @property
    def actors(self) -> list:
        """Every rank of every group (the index records how many workers ran)."""
        return [actor for group in self.groups for actor in group.actors]

    def describe(self) -> dict:
        """Rank 0's facts, with each rank's partition bytes and the whole model's bytes."""
        facts = self.groups[0].facts
        described = {key: value for key, value in facts[0].items() if key not in ("partition_bytes", "rank")}
        return described | {"partition_bytes": [rank["partition_bytes"] for rank in facts]}

    def run(self, stage: str, shards: list[int]) -> Iterator[dict]:
        """Receipts of finished shards, a group's step at a time; a failed group's shards are re-queued."""
        ray = self._ray
        queue = deque(shards)
        attempts = {shard: 0 for shard in shards}
        idle = deque(range(len(self.groups)))
        owner: dict = {}  # ref -> group number
        while queue or owner:
            while queue and idle:
                number = idle.popleft()
                step = [queue.popleft() for _ in range(min(self.world, len(queue)))]
                for shard in step:
                    attempts[shard] += 1
                self._dispatch(number, stage, step, owner)
            (ref,), _ = ray.wait(list(owner), num_returns=1)
            number = owner.pop(ref)
            group = self.groups[number]
            group.pending.discard(ref)
            try:
                receipt = ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
                unwrapped = _unwrapped(error) if isinstance(error, ray.exceptions.RayTaskError) else error
                if isinstance(unwrapped, TributaryError):
                    raise unwrapped from None
                self._replace(number, owner)
                for shard in group.shards:
                    if attempts[shard] >= MAX_ATTEMPTS:
                        raise TributaryError(f"{stage} shard {shard} failed {attempts[shard]} times: {error}") from None
                log.warning(
                    "%s shards %s: a rank of their group failed (%s); re-issuing them",
                    stage,
                    group.shards,
                    type(error).__name__,
                )
                queue.extend(group.shards)
                idle.append(number)
                continue
            if receipt is not None:
                group.receipts.append(receipt)
            if not group.pending:
                yield from group.receipts
                group.receipts, group.shards = [], []
                idle.append(number)

    def _dispatch(self, number: int, stage: str, step: list[int], owner: dict) -> None:
        try:
            batches = self._ray.get(self.groups[number].actors[0].batch_count.remote(step))
        except self._ray.exceptions.RayActorError:  # rank 0 died between steps: a fresh group takes the step
            self._replace(number, owner)
            batches = self._ray.get(self.groups[number].actors[0].batch_count.remote(step))
        group = self.groups[number]
        group.shards, group.receipts = step, []
        for rank, actor in enumerate(group.actors):
            shard = step[rank] if rank < len(step) else None
            ref = getattr(actor, stage).remote(shard, batches)
            group.pending.add(ref)
            owner[ref] = number

    def _replace(self, number: int, owner: dict) -> None:
        """Kill every actor of a failed group, forget its calls in flight, start a fresh group in its place."""
        group = self.groups[number]
        for ref in group.pending:
            owner.pop(ref, None)
        for actor in group.actors:
            self._ray.kill(actor)
        self.groups[number] = self._start_group()

    def call_all(self, method: str, *arguments) -> list:
        """`method(*arguments)` on every rank of the first group, the same call on each (so their collectives
        line up); the ranks' answers in rank order. A failed rank is an error: a query is short, so it is
        rerun whole rather than the group rebuilt."""
        ray = self._ray
        actors = self.groups[0].actors
        try:
            return ray.get([getattr(actor, method).remote(*arguments) for actor in actors])
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
            unwrapped = _unwrapped(error) if isinstance(error, ray.exceptions.RayTaskError) else error
            if isinstance(unwrapped, TributaryError):
                raise unwrapped from None
            raise TributaryError(
                f"a rank of the zero3 group failed during {method}: {unwrapped}; run it again"
            ) from None

    def call_every_rank(self, method: str, *arguments) -> None:
        """`method(*arguments)` on every rank of every group (no collectives: a setting, such as the queries a
        scoring pass scores against)."""
        self._ray.get([getattr(actor, method).remote(*arguments) for actor in self.actors])

    def reset(self) -> None:
        for group in self.groups:
            self._ray.get([actor.reset.remote() for actor in group.actors])

    def shutdown(self) -> None:
        for group in self.groups:
            for actor in group.actors:
                self._ray.kill(actor)


def group_count(cluster: ClusterConfig, world: int) -> int:
    """cluster.workers groups, else as many as the cluster's GPUs (or CPUs / cpus_per_worker) hold, at least one."""
    import ray

    if cluster.workers is not None:
        return cluster.workers
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and cluster.gpus_per_worker > 0:
        if gpus < cluster.gpus_per_worker * world:
            raise TributaryError(
                f"a zero3 group of placement.devices_per_replica {world} ranks needs "
                f"{cluster.gpus_per_worker * world:g} GPUs but the cluster has {gpus}; lower "
                "placement.devices_per_replica or add nodes"
            )
        return int(gpus // (cluster.gpus_per_worker * world))
    cpus = resources.get("CPU", 0)
    if cpus < cluster.cpus_per_worker * world:  # the group's actors would wait for resources forever
        raise TributaryError(
            f"a zero3 group of placement.devices_per_replica {world} ranks needs {cluster.cpus_per_worker * world:g} "
            f"CPUs (cluster.cpus_per_worker {cluster.cpus_per_worker:g} each) but the cluster has {cpus:g}; lower "
            "cluster.cpus_per_worker or placement.devices_per_replica, or add nodes"
        )
    return max(1, int(cpus // (cluster.cpus_per_worker * world)))
