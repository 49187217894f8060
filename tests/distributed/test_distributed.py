"""The index on Ray: any number of workers gives the single-process store; faults lose nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.config import parse_config
from engine.local_or_ray import run_index, run_query
from engine.query.scoring import top_k
from engine.store import GradientStore
from engine.store.nodes import read
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import (
    assert_same_store,
    run_cli,
    single_thread_store,
    store_config,
    store_contents,
    write_config,
)
from tests.requirements import require

ray = require("ray")

TRAIN = SENTENCES + [
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the fox eats berries in the forest",
    "a crow eats seeds in the meadow",
]  # exact ties


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_jsonl(path, [{"id": f"r{i:02d}", "text": text} for i, text in enumerate(TRAIN)])


@pytest.fixture(scope="module")
def reference_store(tiny_models, train_file, tmp_path_factory):
    """The single-process core's store (12 rows in 4 shards of 3), at the workers' thread count."""
    return single_thread_store(
        tiny_models["gpt2"], train_file, str(tmp_path_factory.mktemp("reference") / "store.zarr")
    )


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_give_the_single_process_store(workers, local_ray, tiny_models, train_file, reference_store, tmp_path):
    path = str(tmp_path / "store.zarr")
    raw = store_config(tiny_models["gpt2"], train_file, path, cluster={"address": "local", "workers": workers})
    run_index(parse_config(raw), show_progress=False)
    manifest = GradientStore.open(path).manifest
    assert manifest.complete and manifest.runs[-1].workers == workers
    assert len({entry.pid for entry in manifest.shards["gradients"].values()}) == workers
    assert_same_store(store_contents(path), store_contents(reference_store))


@pytest.mark.parametrize("stage,shard", [("gradients", 1), ("lambdas", 2)])
def test_actor_killed_mid_shard_is_reissued(
    stage, shard, local_ray, tiny_models, train_file, reference_store, tmp_path, monkeypatch
):
    marker = tmp_path / "killed"
    monkeypatch.setenv("TRIBUTARY_CHAOS", f"actor:{stage}:{shard}:{marker}")
    path = str(tmp_path / "store.zarr")
    raw = store_config(tiny_models["gpt2"], train_file, path, cluster={"address": "local", "workers": 2})
    run_index(parse_config(raw), show_progress=False)
    assert marker.exists(), "the chaos hook did not fire: the test would prove nothing"
    killed_pid = int(marker.read_text())
    manifest = GradientStore.open(path).manifest
    computed = manifest.runs[-1].computed[stage]
    assert sorted(computed) == list(range(4)), "every shard committed exactly once"
    assert manifest.shards[stage][shard].pid != killed_pid
    contents = store_contents(path)
    assert contents["ids"] == [f"r{i:02d}" for i in range(len(TRAIN))] and (contents["meta"]["num_tokens"] > 0).all()
    assert_same_store(contents, store_contents(reference_store))


def test_driver_killed_then_resumed_redoes_only_unfinished_shards(tiny_models, train_file, reference_store, tmp_path):
    path = str(tmp_path / "store.zarr")
    config = write_config(tmp_path / "job.yaml", store_config(tiny_models["gpt2"], train_file, path))
    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = run_cli(
        "index", str(config), "--no-progress", env={"TRIBUTARY_CHAOS": "driver:gradients:2", **single_thread}
    )
    assert killed.returncode == -9, killed.stderr
    manifest = GradientStore.open(path).manifest
    assert not manifest.complete and len(manifest.completed_shards) == 2
    first = set(manifest.runs[0].computed["gradients"])
    resumed = run_cli("index", str(config), "--no-progress", env=single_thread)
    assert resumed.returncode == 0, resumed.stderr
    manifest = GradientStore.open(path).manifest
    assert manifest.complete and len(manifest.runs) == 2
    redone = manifest.runs[1].computed["gradients"]
    assert sorted(redone) == sorted(set(range(4)) - first), "only the unfinished shards are redone"
    assert "stale" not in resumed.stderr or "lock" in resumed.stderr
    assert_same_store(store_contents(path), store_contents(reference_store))


def test_verify_names_the_chunk_whose_bytes_flipped(reference_store, tmp_path):
    import shutil
    from pathlib import Path

    copy = tmp_path / "store.zarr"
    shutil.copytree(reference_store, copy)
    clean = run_cli("info", str(copy), "--verify")
    assert clean.returncode == 0 and json.loads(clean.stdout)["verify"]["problems"] == []
    chunk = Path(copy) / "grads" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    flipped = run_cli("info", str(copy), "--verify")
    assert flipped.returncode == 1
    problems = json.loads(flipped.stdout)["verify"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("grads/c/2/0 (rows 6..8)")
    assert "grads/c/2/0" in flipped.stderr


def test_index_refuses_a_store_built_with_another_projection(tiny_models, train_file, reference_store):
    raw = store_config(tiny_models["gpt2"], train_file, reference_store, projection={"seed": 4})
    from engine.errors import TributaryError

    with pytest.raises(TributaryError, match="different projection"):
        run_index(parse_config(raw), show_progress=False)


def test_sharded_top_k_equals_dense_top_k_with_ties(local_ray, tiny_models, train_file, tmp_path):
    # One row per batch: a duplicated sentence then meets the same kernels as its original, so their rows
    # are bit-identical (in batches of 2 the padding and partner change the GEMM shapes and its rounding).
    path = single_thread_store(tiny_models["gpt2"], train_file, str(tmp_path / "store.zarr"), data={"batch_size": 1})
    queries = write_jsonl(tmp_path / "q.jsonl", [{"text": t} for t in TRAIN[:5]])
    raw = store_config(tiny_models["gpt2"], train_file, path, data={"batch_size": 1}, method={"name": "grad_dot"})
    dense = run_query(parse_config(raw), str(queries), k=12)
    cluster = dict(raw, cluster={"address": "local", "workers": 3})
    sharded = run_query(parse_config(cluster), str(queries), k=12, scores_out=str(tmp_path / "s.npy"))
    assert dense.total is not None and sharded.total is not None and np.array_equal(sharded.total, dense.total)
    expected = top_k(dense.total, 12)
    assert np.array_equal(sharded.top_indices, expected) and np.array_equal(dense.top_indices, expected)
    # the duplicated sentences tie exactly, and the lower training index comes first
    tied = [(i, TRAIN.index(t)) for i, t in enumerate(TRAIN) if TRAIN.index(t) != i]
    assert tied
    rows = read(GradientStore.open(path).group, "grads")
    assert all(np.array_equal(rows[duplicate], rows[original]) for duplicate, original in tied)
    for q in range(5):
        ranks = {int(index): rank for rank, index in enumerate(sharded.top_indices[q])}
        for duplicate, original in tied:
            assert dense.total[q, duplicate] == dense.total[q, original]
            assert ranks[original] < ranks[duplicate]
