"""A real two-node Ray cluster on this machine: a head and a second `ray start` node, each with one CPU
and its own custom resource, both on loopback (127.0.0.2), started and stopped by this module.

With one CPU per node and cpus_per_worker = 1, the two index actors are forced onto different nodes, so
the manifest must show both nodes writing shards; the store must equal the single-process one (bitwise
rows at one torch thread), and a query through the cluster must give the single-process scores.

The driver (`tributary index` / `tributary query`) runs as a subprocess, so it connects to the cluster
freshly whatever Ray state this pytest process holds. tests/ray_nodes.py starts and stops the nodes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.config import parse_config
from engine.local_or_ray import run_query
from engine.store import GradientStore
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import (
    assert_same_store,
    run_cli,
    single_thread_store,
    store_config,
    store_contents,
    write_config,
)
from tests.ray_nodes import cluster_section, require_ray_cli, running_cluster

require_ray_cli()

TRAIN = SENTENCES + [
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the fox eats berries in the forest",
    "a crow eats seeds in the meadow",
]  # 12 rows, 4 shards
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_nodes():
    with running_cluster("trib2n-") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("two_nodes_data") / "train.jsonl"
    return write_jsonl(path, [{"id": f"r{i:02d}", "text": text} for i, text in enumerate(TRAIN)])


@pytest.fixture(scope="module")
def queries_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("two_nodes_queries") / "queries.jsonl"
    return write_jsonl(path, [{"text": text} for text in TRAIN[:5]])


@pytest.fixture(scope="module")
def single_process_store(tiny_models, train_file, tmp_path_factory):
    """The single-process store at one torch thread (the workers' thread count: cpus_per_worker = 1)."""
    return single_thread_store(
        tiny_models["gpt2"], train_file, str(tmp_path_factory.mktemp("two_nodes_reference") / "store.zarr")
    )


@pytest.fixture(scope="module")
def two_node_store(two_nodes, tiny_models, train_file, tmp_path_factory):
    """`tributary index` run as its own process against the two-node cluster: (config path, store path)."""
    root = tmp_path_factory.mktemp("two_nodes_index")
    path = str(root / "store.zarr")
    config = write_config(
        root / "job.yaml", store_config(tiny_models["gpt2"], train_file, path, cluster=cluster_section(two_nodes))
    )
    done = run_cli("index", str(config), "--no-progress", env=SINGLE_THREAD, timeout=180)
    assert done.returncode == 0, f"tributary index failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return config, path


def test_both_nodes_write_shards_and_the_store_equals_the_single_process_one(
    two_nodes, two_node_store, single_process_store
):
    _, path = two_node_store
    manifest = GradientStore.open(path).manifest
    assert manifest.complete and manifest.runs[-1].workers == 2
    head, second = two_nodes.node_with("head_node"), two_nodes.node_with("second_node")
    assert head != second
    for stage in ("gradients", "lambdas"):  # EK-FAC: both passes ran on the actors
        shards = manifest.shards[stage]
        assert sorted(shards) == [0, 1, 2, 3]
        writers = {entry.node for entry in shards.values()}
        assert writers == {head, second}, f"{stage}: shards written by {writers}, nodes are {head} and {second}"
        assert len({entry.pid for entry in shards.values()}) == 2
    assert_same_store(store_contents(path), store_contents(single_process_store))


def test_query_through_the_cluster_gives_the_single_process_scores(
    two_node_store, single_process_store, tiny_models, train_file, queries_file, tmp_path
):
    import torch

    config, path = two_node_store
    scores = tmp_path / "scores.npy"
    results = tmp_path / "results.jsonl"
    done = run_cli(
        "query",
        str(config),
        "--queries",
        str(queries_file),
        "--top-k",
        "12",
        "--scores-out",
        str(scores),
        "--out",
        str(results),
        env=SINGLE_THREAD,
        timeout=180,
    )
    assert done.returncode == 0, f"tributary query failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense = run_query(
            parse_config(store_config(tiny_models["gpt2"], train_file, single_process_store)), str(queries_file), k=12
        )
    finally:
        torch.set_num_threads(threads)
    clustered = np.load(scores)
    assert clustered.shape == (5, len(TRAIN))
    assert dense.total is not None
    assert np.array_equal(clustered, dense.total), "scores through the cluster differ from the single-process ones"
    ranked = [[entry["index"] for entry in json.loads(line)["top_k"]] for line in results.read_text().splitlines()]
    assert np.array_equal(np.array(ranked), dense.top_indices)


@pytest.mark.heavy  # the exact factors' two passes and the exact query as CLI processes on the cluster: ~90 s
def test_exact_factors_and_scores_through_the_cluster(
    two_nodes, two_node_store, tiny_models, train_file, queries_file, tmp_path
):
    """`exact: {factors: true}` added to the two-node store fits the full-width factors on both nodes, and
    `tributary query --exact` through the cluster gives the scores of the exact pass in this process."""
    from engine.config import QueryOptions
    from engine.local_or_ray import run_exact
    from tests.distributed_helpers import one_torch_thread

    _, path = two_node_store
    raw = store_config(
        tiny_models["gpt2"], train_file, path, cluster=cluster_section(two_nodes), exact={"factors": True}
    )
    config = write_config(tmp_path / "exact.yaml", raw)
    done = run_cli("index", str(config), "--no-progress", env=SINGLE_THREAD, timeout=240)
    assert done.returncode == 0, f"tributary index failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    manifest = GradientStore.open(path).manifest
    writers = {
        entry.node for stage in ("exact_covariance", "exact_lambdas") for entry in manifest.shards[stage].values()
    }
    assert writers == {two_nodes.node_with("head_node"), two_nodes.node_with("second_node")}
    scores = tmp_path / "exact.npy"
    done = run_cli(
        "query",
        str(config),
        "--queries",
        str(queries_file),
        "--exact",
        "--scores-out",
        str(scores),
        env=SINGLE_THREAD,
        timeout=240,
    )
    assert done.returncode == 0, f"tributary query --exact failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    local = dict(raw)
    local.pop("cluster")
    with one_torch_thread():
        expected = run_exact(parse_config(local), str(queries_file), QueryOptions(k=3)).scores
    assert np.allclose(np.load(scores), expected, rtol=1e-5, atol=0)
