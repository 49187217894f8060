"""A training run indexed on Ray actors equals the single-process run store: every checkpoint's store bit for
bit (at the workers' thread count), and Source's segment factors (whose Λ pass runs on the actors).

Heavy: every checkpoint and every segment Λ pass starts a fresh actor pool (the workers load that
checkpoint's weights), about 2-3 minutes on a 2-core machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import parse_config
from engine.local_or_ray import run_index
from engine.store.run_store import RunStore
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import assert_same_store, local_ray, store_config, store_contents
from tests.requirements import require
from tests.trained_checkpoints import train_checkpoints

ray = require("ray")


@pytest.fixture(scope="module", name="local_ray")
def local_ray_fixture():
    with local_ray():
        yield


@pytest.mark.heavy
def test_run_on_two_workers_equals_single_process(local_ray, tiny_models, tmp_path):
    train_checkpoints(tiny_models["gpt2"], tmp_path / "trainer", saves=(2, 4))
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    run = {"trainer_dir": str(tmp_path / "trainer")}

    def build(path: str, cluster: dict | None) -> RunStore:
        store = run_index(
            parse_config(store_config(tiny_models["gpt2"], train, path, cluster=cluster, training_run=run)),
            show_progress=False,
        )
        assert isinstance(store, RunStore)
        return store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = build(str(tmp_path / "single.zarr"), None)
    finally:
        torch.set_num_threads(threads)
    distributed = build(str(tmp_path / "ray.zarr"), {"address": "local", "workers": 2})
    for key in ("c0", "c1"):
        manifest = distributed.checkpoint(key).manifest
        assert len({entry.pid for entry in manifest.shards["segment_lambdas"].values()}) == 2
        assert_same_store(
            store_contents(distributed.checkpoint_path(key)), store_contents(reference.checkpoint_path(key))
        )
    ours, theirs = distributed.read_segment_factors(0), reference.read_segment_factors(0)
    for name, factors in theirs.items():
        np.testing.assert_allclose(
            ours[name].lam, factors.lam, rtol=0, atol=1e-10 * max(1.0, np.abs(factors.lam).max())
        )
