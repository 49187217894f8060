"""One call on actors started for it: each actor is built from its own arguments, all get the same call, and
they are stopped afterwards (the query's row-range scorers; engine.local_or_ray says which class)."""

from __future__ import annotations

from typing import Any


def call_on_new_actors(
    actor: type, constructions: list[tuple], num_cpus: float, method: str, payload: Any, *arguments: Any
) -> list:
    """`method(payload, *arguments)` on one new actor of `actor` per tuple in `constructions`; the answers in
    that order. The payload (a large array) is put in Ray's object store once, for every actor to read."""
    import ray

    remote = ray.remote(actor).options(num_cpus=num_cpus)
    actors = [remote.remote(*construction) for construction in constructions]
    try:
        shared = ray.put(payload)
        return ray.get([getattr(handle, method).remote(shared, *arguments) for handle in actors])
    finally:
        for handle in actors:
            ray.kill(handle)  # pyright: ignore[reportArgumentType] - ray types .remote() as handle | class
