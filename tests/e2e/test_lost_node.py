"""A node lost mid-run: on the two-node loopback cluster of tests/ray_nodes.py, the second node's whole session
(raylet, object store, workers) is SIGKILLed while one of its workers is certainly inside a shard.

Determinism: TRIBUTARY_CHAOS "stall:STAGE:NODE:MARKER" makes the first worker on the second node that reaches
STAGE's fault point (mid-shard, after its rows are written) write MARKER and sleep; the test kills the node
once MARKER exists, so the kill always lands after a shard started there and before the run can finish.

The driver runs as a CLI process. How soon it noticed is the time from the kill to its "re-issuing" line: the
killed processes' connections break and Ray fails the call at once (1.4-2.0 s measured, with Ray's default
health checks too). The head's GCS runs its health checks 10x faster than Ray's defaults here (HEALTH_CHECKS)
so that it counts the killed node dead within a second, which the cluster.min_nodes tests rely on.

What must hold: the store is the clean single-process one byte for byte (every Zarr array); exact scores are
the clean ones; with cluster.min_nodes the run stops with one line and a store that resumes to the clean one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.config import QueryOptions, parse_config
from engine.local_or_ray import run_exact, run_index
from engine.store import GradientStore
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import ROOT, one_torch_thread, single_thread_store, store_config, write_config
from tests.ray_nodes import TwoNodeCluster, cluster_section, require_ray_cli, running_cluster

require_ray_cli()
pytestmark = [pytest.mark.heavy, pytest.mark.requires_ray]  # a cluster, a kill and a CLI run each: ~60 s

TRAIN = SENTENCES + [
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the fox eats berries in the forest",
    "a crow eats seeds in the meadow",
]  # 12 rows, 4 shards
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The GCS declares a killed node dead after 3 missed checks 300 ms apart (Ray's defaults: 5 x 3 s).
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "300",
    "RAY_health_check_timeout_ms": "300",
    "RAY_health_check_failure_threshold": "3",
}
NOTICE_BOUND_S = 10  # measured 1.4-2.0 s on a loaded 2-core machine; 5x that before a test calls it slow
STALL_WAIT_S = 120  # until the worker on the second node is inside its shard (the model loads first)
RUN_TIMEOUT_S = 240
REPLACE_WAIT_S = 90  # a replacement `ray start` joins in ~10-30 s on a loaded machine


@pytest.fixture(scope="module")
def cluster():
    with running_cluster("tribln-", environment=HEALTH_CHECKS) as nodes:
        yield nodes


@pytest.fixture
def second_node(cluster) -> str:
    """The node with resource second_node; one killed by an earlier test is replaced by a fresh one first."""
    if not any(name in cluster.named for name in ("second", "third")):
        return cluster.add_node("second", "second_node")
    return cluster.node_with("second_node")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lost_node_data")
    train = write_jsonl(root / "train.jsonl", [{"id": f"r{i:02d}", "text": t} for i, t in enumerate(TRAIN)])
    queries = write_jsonl(root / "queries.jsonl", [{"text": t} for t in TRAIN[:3]])
    return train, queries


@pytest.fixture(scope="module")
def clean_store(tiny_models, data, tmp_path_factory) -> str:
    """The clean store: one process at one torch thread (the workers' count at cpus_per_worker = 1)."""
    path = str(tmp_path_factory.mktemp("lost_node_clean") / "store.zarr")
    return single_thread_store(tiny_models["gpt2"], data[0], path)


class Driver:
    """A `tributary` CLI process; its output lines are timestamped as they arrive."""

    def __init__(self, *args: str, chaos: str | None = None):
        # COLUMNS: rich's log lines unwrapped, so a message is one line to look for
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", COLUMNS="400", **SINGLE_THREAD)
        if chaos:
            env["TRIBUTARY_CHAOS"] = chaos
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the driver did not finish within {RUN_TIMEOUT_S} s:\n{self.output()}") from None
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)[-6000:]

    def said(self, text: str) -> bool:
        return self.first(text) is not None

    def first(self, text: str) -> float | None:
        return next((at for at, line in self.lines if text in line), None)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def kill_when_stalled(cluster: TwoNodeCluster, driver: Driver, marker: Path) -> float:
    """Kill the second node once its worker sits inside a shard; the kill's time."""
    deadline = time.monotonic() + STALL_WAIT_S
    while not marker.exists():
        if driver.process.poll() is not None:
            raise AssertionError(f"the driver ended before a shard stalled on the second node:\n{driver.output()}")
        if time.monotonic() > deadline:
            driver.kill()
            raise AssertionError(f"no shard stalled on the second node within {STALL_WAIT_S} s:\n{driver.output()}")
        time.sleep(0.1)
    cluster.kill("second")
    return time.monotonic()


def arrays(path: str) -> dict[str, tuple[str, tuple, bytes]]:
    """Every Zarr array under the store: dtype, shape and bytes, by path."""
    found: dict[str, tuple[str, tuple, bytes]] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, member in group.members():
            if isinstance(member, zarr.Group):
                walk(member, f"{prefix}{name}/")
            else:
                value = np.asarray(member[...])
                found[prefix + name] = (str(value.dtype), value.shape, value.tobytes())

    walk(zarr.open_group(path, mode="r"), "")
    return found


def assert_identical_stores(path: str, clean: str) -> None:
    ours, reference = arrays(path), arrays(clean)
    assert sorted(ours) == sorted(reference)
    differ = [name for name in reference if ours[name] != reference[name]]
    assert not differ, f"arrays that differ from the clean store: {differ}"


def test_a_node_lost_mid_index_has_its_shards_redone_and_the_store_is_the_clean_one(
    cluster, second_node, tiny_models, data, clean_store, tmp_path
):
    path = str(tmp_path / "store.zarr")
    config = write_config(
        tmp_path / "job.yaml",
        store_config(tiny_models["gpt2"], data[0], path, cluster=cluster_section(cluster)),
    )
    marker = tmp_path / "stalled"
    driver = Driver("index", str(config), "--no-progress", chaos=f"stall:gradients:{second_node}:{marker}")
    try:
        killed = kill_when_stalled(cluster, driver, marker)
        code = driver.wait()
    finally:
        driver.kill()
    assert code == 0, driver.output()
    noticed = driver.first("re-issuing it")
    assert noticed is not None, f"the driver never said it re-issued a shard:\n{driver.output()}"
    print(f"lost node noticed {noticed - killed:.2f} s after the kill")
    assert noticed - killed < NOTICE_BOUND_S

    manifest = GradientStore.open(path).manifest
    head = cluster.node_with("head_node")
    stalled = int(marker.read_text())
    assert manifest.complete
    assert manifest.shards["gradients"][stalled].node == head  # redone on the remaining node
    assert {entry.node for entry in manifest.shards["lambdas"].values()} == {head}
    assert_identical_stores(path, clean_store)


@pytest.fixture(scope="module")
def exact_store(tiny_models, data, tmp_path_factory) -> dict:
    """A store with its full-width factors, indexed in this process; the raw config (no cluster section)."""
    path = str(tmp_path_factory.mktemp("lost_node_exact") / "store.zarr")
    raw = store_config(tiny_models["gpt2"], data[0], path, exact={"factors": True})
    with one_torch_thread():
        run_index(parse_config(raw), show_progress=False)
    return raw


def test_a_node_lost_mid_exact_scoring_gives_the_clean_scores(cluster, second_node, exact_store, data, tmp_path):
    with one_torch_thread():
        clean = run_exact(parse_config(exact_store), str(data[1]), QueryOptions(k=3)).scores
    config = write_config(tmp_path / "exact.yaml", dict(exact_store, cluster=cluster_section(cluster)))
    marker = tmp_path / "stalled"
    scores = tmp_path / "scores.npy"
    driver = Driver(
        "query",
        str(config),
        "--queries",
        str(data[1]),
        "--exact",
        "--scores-out",
        str(scores),
        chaos=f"stall:exact_scores:{second_node}:{marker}",
    )
    try:
        killed = kill_when_stalled(cluster, driver, marker)
        code = driver.wait()
    finally:
        driver.kill()
    assert code == 0, driver.output()
    noticed = driver.first("re-issuing it")
    assert noticed is not None, f"the driver never said it re-issued a shard:\n{driver.output()}"
    print(f"lost node noticed {noticed - killed:.2f} s after the kill (exact scoring)")
    assert noticed - killed < NOTICE_BOUND_S
    assert np.array_equal(np.load(scores), clean)


def test_min_nodes_stops_with_one_line_and_the_resumed_store_is_the_clean_one(
    cluster, second_node, tiny_models, data, clean_store, tmp_path
):
    path = str(tmp_path / "store.zarr")
    raw = store_config(tiny_models["gpt2"], data[0], path, cluster=cluster_section(cluster, min_nodes=2, node_wait_s=2))
    config = write_config(tmp_path / "job.yaml", raw)
    marker = tmp_path / "stalled"
    driver = Driver("index", str(config), "--no-progress", chaos=f"stall:gradients:{second_node}:{marker}")
    try:
        kill_when_stalled(cluster, driver, marker)
        code = driver.wait()
    finally:
        driver.kill()
    assert code == 2, driver.output()  # the CLI's exit code for a TributaryError
    errors = [line for _, line in driver.lines if line.startswith("error:")]
    assert len(errors) == 1, driver.output()
    assert "1 Ray node(s) alive but cluster.min_nodes is 2" in errors[0], errors[0]
    assert "run the same command again to resume" in errors[0]
    assert "Traceback" not in driver.output()
    stopped = GradientStore.open(path).manifest
    assert not stopped.complete

    cluster.add_node("second", "second_node")
    again = Driver("index", str(config), "--no-progress")
    try:
        assert again.wait() == 0, again.output()
    finally:
        again.kill()
    assert "resuming" in again.output()
    assert_identical_stores(path, clean_store)


def test_min_nodes_waits_for_a_replacement_whose_worker_takes_the_lost_ones_work(
    cluster, second_node, tiny_models, data, clean_store, tmp_path
):
    path = str(tmp_path / "store.zarr")
    raw = store_config(
        tiny_models["gpt2"], data[0], path, cluster=cluster_section(cluster, min_nodes=2, node_wait_s=REPLACE_WAIT_S)
    )
    config = write_config(tmp_path / "job.yaml", raw)
    marker = tmp_path / "stalled"
    driver = Driver("index", str(config), "--no-progress", chaos=f"stall:gradients:{second_node}:{marker}")
    try:
        kill_when_stalled(cluster, driver, marker)
        replacement = cluster.add_node("third", "second_node")  # the same resource: a like-for-like machine
        code = driver.wait()
    finally:
        driver.kill()
    assert code == 0, driver.output()
    assert driver.said("waiting up to") and driver.said("alive again"), driver.output()
    manifest = GradientStore.open(path).manifest
    writers = {entry.node for entry in manifest.shards["lambdas"].values()}
    assert replacement in writers, f"the replacement node wrote no lambdas shard: {writers}"
    assert_identical_stores(path, clean_store)
