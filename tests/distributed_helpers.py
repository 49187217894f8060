"""Helpers for the distributed and store tests: configs, store comparison, running the CLI as a process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
import zarr

from engine.store import GradientStore

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def local_ray(cpus: int = 2) -> Iterator[None]:
    """A Ray instance in this process for a test, on a loopback address (nothing listens on other interfaces),
    shut down afterwards whatever happens."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level=logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


def store_config(model: Path, train: Path, store: str, cluster: dict | None = None, **sections) -> dict:
    raw = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(train), "max_length": 32, "batch_size": 2},
        "projection": {"dim": 4, "seed": 3},
        "curvature": {"strategy": "ekfac", "seed": 1},
        "method": {"name": "if"},
        "store": {"path": store, "dtype": "float32", "rows_per_chunk": 3},
    }
    for section, values in sections.items():
        raw[section] = dict(raw.get(section, {}), **values)
    if cluster is not None:
        raw["cluster"] = cluster
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def store_contents(path: str) -> dict:
    store = GradientStore.open(path)
    factors = store.read_factors()
    grads = store.group["grads"]
    assert isinstance(grads, zarr.Array), f"{path}: grads is not an array"
    return {
        "grads": grads[...],
        "ids": store.ids(),
        "meta": store.row_metadata(),
        "factors": {name: {field: getattr(f, field) for field in ("lam", "q_a", "q_s")} for name, f in factors.items()},
    }


def assert_same_store(ours: dict, reference: dict, factor_tolerance: float = 1e-10) -> None:
    assert ours["ids"] == reference["ids"]
    assert ours["grads"].dtype == reference["grads"].dtype
    assert np.array_equal(ours["grads"], reference["grads"]), "stored rows differ (bitwise)"
    for key in ("num_tokens", "loss"):
        assert np.array_equal(ours["meta"][key], reference["meta"][key])
    assert ours["factors"].keys() == reference["factors"].keys()
    for name, fields in reference["factors"].items():
        for field, value in fields.items():
            other = ours["factors"][name][field]
            if value is None:
                assert other is None
                continue
            if field == "lam":
                np.testing.assert_allclose(other, value, rtol=0, atol=factor_tolerance * max(1.0, np.abs(value).max()))
            else:  # eigenvectors up to sign: compare the projectors Q diag(1) Qᵀ column by column
                signs = np.sign(np.sum(other * value, axis=0))
                np.testing.assert_allclose(other * signs, value, rtol=0, atol=1e-8)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the body at one torch thread, the Ray workers' count at cpus_per_worker = 1, then restore the count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_thread_store(model: Path, train: Path, path: str, **sections) -> str:
    """The single-process store at one torch thread — the workers' count (cpus_per_worker = 1).

    BLAS kernels may round differently with another thread count, so bitwise equality with the
    distributed store is claimed (and documented) at the same thread count.
    """
    from engine.config import parse_config
    from engine.local_or_ray import run_index

    with one_torch_thread():
        run_index(parse_config(store_config(model, train, path, **sections)), show_progress=False)
    return path
