"""A real two-node Ray cluster on this machine: a head and a second `ray start` node, each with one CPU
and its own custom resource, both on loopback (127.0.0.2), started and stopped by this module.

With one CPU per node and cpus_per_worker = 1, the two index actors are forced onto different nodes, so
the manifest must show both nodes writing shards; the store must equal the single-process one (bitwise
rows at one torch thread), and a query through the cluster must give the single-process scores.

The driver (`tributary index` / `tributary query`) runs as a subprocess, so it connects to the cluster
freshly whatever Ray state this pytest process holds. Teardown signals exactly the `ray start`
processes this module launched (each in its own session) and kills whatever is left of those sessions;
it never runs `ray stop`, which would stop every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import parse_config
from engine.local_or_ray import run_query
from engine.store import GradientStore
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import (
    ROOT,
    assert_same_store,
    run_cli,
    single_thread_store,
    store_config,
    store_contents,
    write_config,
)

RAY_CLI = Path(sys.executable).with_name("ray")
if not RAY_CLI.exists():
    pytest.skip(f"the `ray` CLI is not installed next to {sys.executable}", allow_module_level=True)

IP = "127.0.0.2"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20
TRAIN = SENTENCES + [
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the fox eats berries in the forest",
    "a crow eats seeds in the meadow",
]  # 12 rows, 4 shards
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Asks the cluster (from a fresh process) for its alive nodes, polling until there are `want` of them.
NODES_PROBE = """
import json, sys, time
import ray
address, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
ray.init(address=address, _node_ip_address=sys.argv[4], logging_level="ERROR", log_to_driver=False)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in alive]))
"""


def _ray_env() -> dict:
    return dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((IP, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _session_members(sessions: set[int]) -> list[int]:
    """Pids whose session is one of ours (`ray start` ran as a session leader: every Ray process it spawned,
    workers included, stays in that session)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) not in sessions:
                continue
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if state != "Z":  # a zombie has exited already; its parent reaps it
            members.append(int(entry))
    return members


class TwoNodeCluster:
    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.address = ""
        self.nodes: list[dict] = []

    def _start(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = self.temp_dir.parent / f"{self.temp_dir.name}-{name}.log"
        self.logs.append(log)
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [str(RAY_CLI), "start", "--block", *arguments],
                cwd=ROOT,
                env=_ray_env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def _fail(self, message: str) -> None:
        logs = "\n".join(f"--- {log.name}\n{_tail(log)}" for log in self.logs)
        raise RuntimeError(f"{message}\n{logs}")

    def start(self) -> None:
        gcs, client, dashboard, head_agent, second_agent = _free_ports(5)
        self.address = f"{IP}:{gcs}"
        common = [
            f"--node-ip-address={IP}",
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        head = self._start(
            "head",
            [
                "--head",
                f"--port={gcs}",
                *common,
                '--resources={"head_node": 1}',
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={client}",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={head_agent}",
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the GCS answers once the head is up
            if head.poll() is not None:
                self._fail(f"the head node exited with {head.returncode}")
            try:
                socket.create_connection((IP, gcs), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._fail(f"the head's GCS did not listen on {self.address} within {START_TIMEOUT_S} s")
                time.sleep(0.5)
        second = self._start(
            "second",
            [
                f"--address={self.address}",
                *common,
                '--resources={"second_node": 1}',
                f"--temp-dir={self.temp_dir}",
                f"--dashboard-agent-listen-port={second_agent}",
            ],
        )
        left = max(5.0, deadline - time.monotonic())
        try:
            probe = subprocess.run(
                [sys.executable, "-c", NODES_PROBE, self.address, "2", str(left), IP],
                cwd=ROOT,
                env=_ray_env(),
                capture_output=True,
                text=True,
                timeout=left + 30,
            )
        except subprocess.TimeoutExpired:
            self._fail("asking the cluster for its nodes timed out")
        if probe.returncode != 0:
            self._fail(f"asking the cluster for its nodes failed:\n{probe.stderr[-3000:]}")
        self.nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        for process, name in ((head, "head"), (second, "second")):
            if process.poll() is not None:
                self._fail(f"the {name} node exited with {process.returncode}")
        if len(self.nodes) != 2:
            self._fail(f"expected 2 alive nodes within {START_TIMEOUT_S} s, got {self.nodes}")

    def node_with(self, resource: str) -> str:
        (node,) = [n["id"] for n in self.nodes if resource in n["resources"]]
        return node

    def stop(self) -> None:
        """SIGTERM our `ray start --block` processes (they shut their node down), then SIGKILL whatever is
        left of their sessions. Nothing outside the sessions this module started is touched."""
        sessions = {p.pid for p in self.processes}
        for process in reversed(self.processes):  # the second node first, then the head
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            for process in self.processes:
                process.poll()  # reap the `ray start` processes, our children
            if not _session_members(sessions):
                break
            time.sleep(0.25)
        for pid in _session_members(sessions):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def two_nodes():
    # A short root: Ray puts unix sockets under <temp dir>/session_*/sockets (paths are limited to 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="trib2n-", dir="/tmp"))
    cluster = TwoNodeCluster(temp_dir / "ray")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def cluster_section(cluster: TwoNodeCluster) -> dict:
    return {"address": cluster.address, "workers": 2, "cpus_per_worker": 1, "node_ip_address": IP}


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
