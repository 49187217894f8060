"""cluster.min_nodes and node_wait_s: the config's refusals, and the wait for a replacement node (the alive count
faked; tests/e2e/test_lost_node.py kills real nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ClusterConfig, parse_config
from engine.distributed import nodes
from engine.errors import TributaryError
from tests.distributed_helpers import store_config


def _parse(cluster: dict):
    return parse_config(store_config(Path("model"), Path("train.jsonl"), "store.zarr", cluster=cluster))


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({"address": "local", "min_nodes": 2}, "cluster: address local is one node, so min_nodes above 1"),
        ({"address": "h:6379", "node_wait_s": 5}, "cluster: node_wait_s is for min_nodes"),
        ({"address": "h:6379", "min_nodes": 0}, "cluster.min_nodes: Input should be greater than 0"),
        ({"address": "h:6379", "min_nodes": True}, "cluster.min_nodes: must be a number, not true or false"),
        ({"address": "h:6379", "min_nodes": 2, "node_wait_s": -1}, "cluster.node_wait_s: Input should be greater"),
    ],
)
def test_bad_node_settings_are_refused_naming_the_field(cluster, message):
    with pytest.raises(TributaryError, match=message):
        _parse(cluster)


def test_min_nodes_one_on_a_local_cluster_and_two_on_a_joined_one_are_accepted():
    assert _parse({"address": "local", "min_nodes": 1}).cluster == ClusterConfig(address="local", min_nodes=1)
    cluster = _parse({"address": "h:6379", "min_nodes": 2, "node_wait_s": 0}).cluster
    assert cluster is not None and (cluster.min_nodes, cluster.node_wait_s) == (2, 0)


def _counts(monkeypatch, counts: list[int]) -> list[int]:
    seen: list[int] = []

    def alive() -> int:
        seen.append(counts[min(len(seen), len(counts) - 1)])
        return seen[-1]

    monkeypatch.setattr(nodes, "alive_nodes", alive)
    monkeypatch.setattr(nodes, "NODE_POLL_S", 0.001)
    return seen


def test_without_min_nodes_nothing_is_asked(monkeypatch):
    seen = _counts(monkeypatch, [0])
    assert nodes.require_nodes(ClusterConfig(address="h:1"), "gradients") is False
    assert seen == []


def test_enough_nodes_go_on_at_once(monkeypatch):
    seen = _counts(monkeypatch, [3])
    assert nodes.require_nodes(ClusterConfig(address="h:1", min_nodes=2), "gradients") is False
    assert seen == [3]


def test_a_node_that_joins_within_the_wait_lets_the_run_go_on(monkeypatch):
    seen = _counts(monkeypatch, [1, 1, 1, 2])
    assert nodes.require_nodes(ClusterConfig(address="h:1", min_nodes=2, node_wait_s=60), "gradients") is True
    assert seen == [1, 1, 1, 2]


def test_no_node_within_the_wait_stops_with_one_line_naming_the_count_and_the_resume(monkeypatch):
    _counts(monkeypatch, [1])
    with pytest.raises(TributaryError) as raised:
        nodes.require_nodes(ClusterConfig(address="h:1", min_nodes=3, node_wait_s=0.05), "lambdas")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("lambdas: 1 Ray node(s) alive but cluster.min_nodes is 3")
    assert "cluster.node_wait_s (0.05 s)" in message and "run the same command again to resume" in message
