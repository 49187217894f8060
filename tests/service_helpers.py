"""The service's HTTP API in this process: the replica class itself over a real store and tiny model, without
Ray Serve (Serve's ingress wrapper needs a running Serve), for tests that send it many requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

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


def replica_api(raw: dict) -> tuple[Any, Any]:
    """(the replica, its FastAPI app) for the config `raw`."""
    from engine.serving.app import AttributionService, build_api

    wrapped = cast(type, AttributionService.func_or_class)  # Serve types it as a class or an import path
    replica: Any = next(c for c in wrapped.__mro__ if "_score_batch" in vars(c))
    service = replica.__new__(replica)
    replica.__init__(service, parse_config(raw))
    return service, build_api(service)
