"""Ray nodes on this machine for the cluster tests: a head and more `ray start` nodes, each with one CPU and
its own custom resource, all on loopback (127.0.0.2), started, killed and stopped by this module.

Teardown signals exactly the `ray start` processes this module launched (each in its own session) and kills
whatever is left of those sessions; it never runs `ray stop`, which would stop every Ray process on the machine.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.distributed_helpers import ROOT
from tests.requirements import under_ci

RAY_CLI = Path(sys.executable).with_name("ray")
IP = "127.0.0.2"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


def require_ray_cli() -> None:
    """Skip the module without the `ray` CLI next to this Python; under CI, fail (it is a broken install)."""
    if RAY_CLI.exists():
        return
    reason = f"the `ray` CLI is not installed next to {sys.executable}"
    if under_ci():
        pytest.fail(f"{reason}, and under CI the cluster tests must run", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


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
print("NODES " + json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in alive]), flush=True)
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
    def __init__(self, temp_dir: Path, environment: dict[str, str] | None = None):
        """`environment`: more variables for every node's Ray processes (RAY_health_check_* for the lost-node
        tests, read by the head's GCS)."""
        self.temp_dir = temp_dir
        self.environment = environment or {}
        self.processes: list[subprocess.Popen] = []
        self.named: dict[str, subprocess.Popen] = {}
        self.logs: list[Path] = []
        self.address = ""
        self.nodes: list[dict] = []
        self.ids: dict[str, str] = {}  # node id by name, for the nodes add_node started
        self.killed: set[str] = set()  # ids of nodes killed here (the GCS may still count one alive a moment)

    def _start(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = self.temp_dir.parent / f"{self.temp_dir.name}-{name}.log"
        self.logs.append(log)
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [str(RAY_CLI), "start", "--block", *arguments],
                cwd=ROOT,
                env=dict(_ray_env(), **self.environment),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes.append(process)
        self.named[name] = process
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
        self.add_node("second", "second_node", second_agent)

    def add_node(self, name: str, resource: str, agent_port: int | None = None) -> str:
        """Start a node that joins the cluster, with one CPU and the custom `resource`; its node id, once the
        cluster counts it alive beside the nodes alive now."""
        agent = agent_port or _free_ports(1)[0]
        self._start(
            name,
            [
                f"--address={self.address}",
                f"--node-ip-address={IP}",
                "--num-cpus=1",
                "--num-gpus=0",
                "--object-store-memory=100000000",
                "--disable-usage-stats",
                f'--resources={{"{resource}": 1}}',
                f"--temp-dir={self.temp_dir}",
                f"--dashboard-agent-listen-port={agent}",
            ],
        )
        want = len(self.named)  # the nodes started and not killed, this one included
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.nodes = [n for n in self._alive(want, START_TIMEOUT_S) if n["id"] not in self.killed]
            if len(self.nodes) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for label in ("head", name):
            if self.named[label].poll() is not None:
                self._fail(f"the {label} node exited with {self.named[label].returncode}")
        if len(self.nodes) != want:
            self._fail(f"expected {want} alive nodes within {START_TIMEOUT_S} s, got {self.nodes}")
        self.ids[name] = self.node_with(resource)
        return self.ids[name]

    def _alive(self, want: int, wait_s: float) -> list[dict]:
        """The cluster's alive nodes, asked from a fresh process, polling up to `wait_s` until there are `want`."""
        try:
            probe = subprocess.run(
                [sys.executable, "-c", NODES_PROBE, self.address, str(want), str(wait_s), IP],
                cwd=ROOT,
                env=_ray_env(),
                capture_output=True,
                text=True,
                timeout=wait_s + 60,
            )
        except subprocess.TimeoutExpired:
            self._fail("asking the cluster for its nodes timed out")
            raise  # _fail raised already
        if probe.returncode != 0:
            self._fail(f"asking the cluster for its nodes failed:\n{probe.stderr[-3000:]}")
        # Ray may print to stdout too (a killed node's "raylet has lagging heartbeats" notice, after the answer)
        answers = [line for line in probe.stdout.splitlines() if line.startswith("NODES ")]
        if not answers:
            self._fail(f"asking the cluster for its nodes gave no answer:\n{probe.stdout[-3000:]}")
        return json.loads(answers[-1].removeprefix("NODES "))

    def kill(self, name: str) -> None:
        """SIGKILL every process of node `name`'s session at once (its raylet, object store, workers): a lost
        machine. Its `ray start` process is reaped; the cluster notices by its health checks."""
        process = self.named.pop(name)
        self.killed.add(self.ids.pop(name))
        for pid in _session_members({process.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=STOP_TIMEOUT_S)

    def node_with(self, resource: str) -> str:
        (node,) = [n["id"] for n in self.nodes if resource in n["resources"] and n["id"] not in self.killed]
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


@contextmanager
def running_cluster(prefix: str, environment: dict[str, str] | None = None) -> Iterator[TwoNodeCluster]:
    """A started two-node cluster under a fresh short temp folder, stopped and removed on exit."""
    # Short: Ray puts unix sockets under <temp dir>/session_*/sockets, and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    nodes = TwoNodeCluster(temp_dir / "ray", environment=environment)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_section(cluster: TwoNodeCluster, **more) -> dict:
    """The config's `cluster` section for two one-CPU workers on this cluster, plus `more` keys."""
    return {"address": cluster.address, "workers": 2, "cpus_per_worker": 1, "node_ip_address": IP, **more}
