"""The service's HTTP API in this process: the replica class itself over a real store and tiny model, without
Ray Serve (Serve's ingress wrapper needs a running Serve), for tests that send it many requests; one request
straight to an ASGI app; served records compared with the CLI's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import numpy as np

from engine.config import parse_config
from engine.local_or_ray import run_index
from tests.conftest import SENTENCES, job_config, write_jsonl


def indexed_config(root: Path, model: Path, **serve) -> dict:
    """A complete float64 store of the 8 training sentences (3 chunks), and its config with `serve` options."""
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, model, train, store={"rows_per_chunk": 3})
    run_index(parse_config(raw), show_progress=False)
    raw["serve"] = dict(serve)
    return raw


def replica(plan: Any) -> Any:
    """The replica class itself, in this process, for a ServePlan or a JobConfig."""
    from engine.serving.app import AttributionService

    wrapped = cast(type, AttributionService.func_or_class)  # Serve types it as a class or an import path
    replica_class: Any = next(c for c in wrapped.__mro__ if "_score_batch" in vars(c))
    service = replica_class.__new__(replica_class)
    replica_class.__init__(service, plan)
    return service


def replica_api(raw: dict) -> tuple[Any, Any]:
    """(the replica, its FastAPI app) for the config `raw`."""
    from engine.serving.app import build_api

    service = replica(parse_config(raw))
    return service, build_api(service)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_records(served_records: list[dict], cli: list[dict]) -> None:
    """Everything equal; scores to float64 rounding (a batch's padding and BLAS blocking may differ)."""
    served_records, cli = json.loads(json.dumps(served_records)), json.loads(json.dumps(cli))
    assert len(served_records) == len(cli)
    for ours, theirs in zip(served_records, cli):
        for kind in ("top_k", "bottom_k"):
            np.testing.assert_allclose(
                [e["score"] for e in ours[kind]], [e["score"] for e in theirs[kind]], rtol=1e-9, atol=1e-9
            )
            for entry in ours[kind] + theirs[kind]:
                entry.pop("score")
        assert ours == theirs


def asgi_request(app, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """One request straight to an ASGI app (no server, no HTTP client library)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # Starlette re-raises an unexpected error after answering it
            pass

    asyncio.run(call())
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    payload = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return status, json.loads(payload)


def listed_examples(records: list[dict]) -> list[tuple]:
    """(query, side, rank, row index, row id, source) of every listed example of query records, in order."""
    return [
        (record["id"], side, entry["rank"], entry["index"], entry["id"], entry["source"])
        for record in records
        for side in ("top_k", "bottom_k")
        for entry in record[side]
    ]


def listed_scores(records: list[dict]) -> list[float]:
    return [entry["score"] for record in records for side in ("top_k", "bottom_k") for entry in record[side]]
