"""The exact scoring pass on Ray: its shards run on the executor indexing uses, and the driver places each
shard's scores by row, so 1 and 2 workers give bit-identical scores, and a worker killed mid-pass is redone."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import QueryOptions, parse_config
from engine.local_or_ray import run_exact, run_index
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import store_config
from tests.requirements import require

ray = require("ray")
pytestmark = pytest.mark.heavy  # Ray start and actors that each load the model: about a minute each

TRAIN = SENTENCES + ["the owl eats mice at night", "a bear eats honey in the valley", "a crow eats seeds"]
QUERIES = [{"id": "q0", "text": "the fox eats clams in the snow"}, {"id": "q1", "text": "a wolf eats honey"}]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def indexed(tiny_models, tmp_path_factory):
    """A dim-4 store of 11 rows in 4 shards, with its full-width factors, indexed in this process."""
    root = tmp_path_factory.mktemp("exact")
    train = write_jsonl(root / "train.jsonl", [{"id": f"r{i:02d}", "text": t} for i, t in enumerate(TRAIN)])
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    raw = store_config(tiny_models["gpt2"], train, str(root / "store.zarr"), exact={"factors": True})
    run_index(parse_config(raw), show_progress=False)
    return raw, str(queries)


def _exact(raw: dict, queries: str, workers: int) -> np.ndarray:
    config = parse_config(dict(raw, cluster={"address": "local", "workers": workers}))
    return run_exact(config, queries, QueryOptions(k=3)).scores


def test_one_and_two_workers_give_identical_scores(local_ray, indexed):
    raw, queries = indexed
    one, two = _exact(raw, queries, 1), _exact(raw, queries, 2)
    assert np.isfinite(one).all() and np.abs(one).max() > 0
    assert np.array_equal(one, two)


def test_actor_killed_mid_pass_gives_the_clean_scores(local_ray, indexed, tmp_path, monkeypatch):
    raw, queries = indexed
    clean = _exact(raw, queries, 2)
    marker = tmp_path / "killed"
    monkeypatch.setenv("TRIBUTARY_CHAOS", f"actor:exact_scores:1:{marker}")
    again = _exact(raw, queries, 2)
    assert marker.exists(), "the chaos hook did not fire: the test would prove nothing"
    assert np.array_equal(again, clean)
