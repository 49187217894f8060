"""The Ray a command starts for itself (`cluster.address: local`, and `tributary serve`) listens on loopback
only, and `kill -TERM` to the command's whole process group stops it within 10 s, exit code 0, leaving
no process behind.

Each command runs in a session of its own (start_new_session), so the processes it started are exactly
that session's, and the listening sockets of every one of them are read while it runs (psutil).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from engine.config import parse_config
from engine.local_or_ray import run_index
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import ROOT, store_config
from tests.ports import unused_port
from tests.requirements import require

require("ray")
psutil = require("psutil")

READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 10


def start_in_own_session(*args: str, log: Path) -> subprocess.Popen:
    environment = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env=environment,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _alive(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_processes(leader: int) -> list:
    """Every live process of the session `leader` started, and any of its descendants that left it."""
    found = {}
    try:
        found.update({child.pid: child for child in psutil.Process(leader).children(recursive=True)})
    except psutil.Error:
        pass
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader and process.pid != leader:
                found[process.pid] = process
        except (OSError, psutil.Error):
            continue
    return [process for process in found.values() if _alive(process)]


def listening(processes: list) -> set[tuple[str, str, int]]:
    """(process name, address, port) of each listening TCP socket of these processes."""
    sockets = set()
    for process in processes:
        try:
            name = process.name()
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    sockets.add((name, connection.laddr.ip, connection.laddr.port))
        except psutil.Error:
            continue
    return sockets


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def assert_loopback_only(sockets: set[tuple[str, str, int]]) -> None:
    names = {name for name, _, _ in sockets}
    # Not vacuous: the sockets were read while Ray's core and at least one worker were up.
    assert {"gcs_server", "raylet"} <= names, sorted(sockets)
    assert any(name.startswith("ray::") for name in names), sorted(sockets)
    exposed = sorted(socket for socket in sockets if not is_loopback(socket[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def assert_nothing_left(leader: int) -> None:
    deadline = time.monotonic() + 2  # psutil may still list a process the kernel is tearing down
    left = session_processes(leader)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_processes(leader)
    assert not left, [(process.pid, process.name()) for process in left]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_jsonl(path, [{"id": f"t{i}", "text": text} for i, text in enumerate(SENTENCES)])


def test_a_local_index_run_listens_on_loopback_only(tiny_models, train_file, tmp_path):
    raw = store_config(
        tiny_models["gpt2"], train_file, str(tmp_path / "store.zarr"), cluster={"address": "local", "workers": 2}
    )
    config = tmp_path / "index.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "index.log"
    run = start_in_own_session("index", str(config), "--no-progress", log=log)
    sockets: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while run.poll() is None and time.monotonic() < deadline:
        sockets |= listening(session_processes(run.pid))
        time.sleep(0.1)
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"tributary index did not finish in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    assert run.returncode == 0, log.read_text()[-3000:]
    assert_loopback_only(sockets)
    assert_nothing_left(run.pid)


def wait_until_healthy(service: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.poll() is not None:
            pytest.fail(f"tributary serve exited with {service.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as answer:
                if json.loads(answer.read()) == {"status": "ok"}:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    os.killpg(service.pid, signal.SIGKILL)
    pytest.fail(f"tributary serve did not answer /v1/health in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def attribute(port: int) -> None:
    body = json.dumps({"queries": [{"prompt": "the fox eats", "completion": " berries"}], "top_k": 2}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/attribute", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        results = json.loads(answer.read())["results"]
    assert len(results) == 1 and len(results[0]["top_k"]) == 2


def test_serve_listens_on_loopback_and_stops_on_sigterm_to_its_group(tiny_models, train_file, tmp_path):
    """With a `cluster` section, so the row-range scorer replicas run too."""
    raw = job_config(tmp_path, tiny_models["gpt2"], train_file, store={"rows_per_chunk": 3})
    run_index(parse_config(raw), show_progress=False)
    port = unused_port()
    raw["cluster"] = {"address": "local", "workers": 1, "local_cpus": 2}
    raw["serve"] = {"port": port, "replica_cpus": 0.5}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "serve.log"
    service = start_in_own_session("serve", str(config), log=log)
    try:
        wait_until_healthy(service, port, log)
        attribute(port)  # answered through the row-range scorers: every replica is up
        sockets = listening(session_processes(service.pid))

        os.killpg(service.pid, signal.SIGTERM)  # what `timeout` and systemd send: the whole group
        started = time.monotonic()
        try:
            code = service.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"not stopped {STOP_TIMEOUT_S} s after SIGTERM:\n{log.read_text()[-3000:]}")
        assert code == 0, f"exit code {code} after {time.monotonic() - started:.1f} s:\n{log.read_text()[-3000:]}"
        assert_nothing_left(service.pid)

        assert ("ray::ProxyActor", "127.0.0.1", port) in sockets, sorted(sockets)  # serve.host
        assert any("rows-" in name for name, _, _ in sockets), sorted(sockets)  # a row-range scorer replica
        assert_loopback_only(sockets)
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
        for process in session_processes(service.pid):
            process.kill()
