"""A Serve replica SIGKILLed under load from 32 concurrent clients (issue 32, item 3).

Two replicas serve a float64 store; 32 clients, each on its own keep-alive connection, send one query per
request in a loop. Once every client has had an answer, one replica's worker process is killed with SIGKILL.
Every request must get either the answer `tributary query` gives for the same query (an independent process
scoring the same store) or a clean 503 with Retry-After in the service's error shape; none may take longer
than the request timeout. Serve must start a new replica, and a later round of requests is answered by two
live replicas again. What the clients saw (counts by status, the slowest request) is printed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import yaml

from tests.cli_helpers import invoke
from tests.conftest import PROMPTS, write_jsonl
from tests.ports import unused_port
from tests.requirements import require
from tests.service_helpers import assert_same_records, indexed_config, read_jsonl

ray = require("ray")
require("ray.serve")
psutil = require("psutil")

pytestmark = pytest.mark.heavy

CLIENTS = 32
REQUEST_TIMEOUT_S = 30
QUERIES = [{"prompt": prompt, "completion": " " + completion} for prompt, completion in PROMPTS]
REPLICA_TITLE = "ServeReplica:tributary:attribution"


@dataclass
class Seen:
    query: int
    status: int  # 0: no HTTP answer at all (connection reset, timed out)
    seconds: float
    body: dict
    retry_after: str | None


def post(connection: http.client.HTTPConnection, which: int) -> Seen:
    body = json.dumps({"queries": [QUERIES[which]], "top_k": 5}).encode()
    began = time.perf_counter()
    try:
        connection.request("POST", "/v1/attribute", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        status, retry_after = response.status, response.getheader("Retry-After")
    except (OSError, http.client.HTTPException) as error:
        connection.close()  # reconnects on the next request
        return Seen(which, 0, time.perf_counter() - began, {"error": repr(error)}, None)
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"unparsed": raw[:200].decode(errors="replace")}
    if response.getheader("Connection", "").lower() == "close":
        connection.close()
    return Seen(which, status, time.perf_counter() - began, answer, retry_after)


def replica_pids() -> list[int]:
    """The Serve replica workers of the attribution deployment (Ray titles each worker after its actor)."""
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(REPLICA_TITLE in part for part in process.info["cmdline"] or []):
            pids.append(process.info["pid"])
    return pids


def running_replicas() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    deployment = serve.status().applications["tributary"].deployments["attribution"]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


def replica_ids_answering(port: int, attempts: int = 64) -> set[str]:
    """The replica ids that answer /v1/info over fresh connections (Serve spreads new ones over replicas)."""
    seen = set()
    for _ in range(attempts):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        connection.request("GET", "/v1/info")
        response = connection.getresponse()
        if response.status == 200:
            seen.add(json.loads(response.read())["replica"]["id"])
        connection.close()
    return seen


def test_a_replica_killed_under_load(tiny_models, tmp_path):
    raw = indexed_config(
        tmp_path,
        tiny_models["gpt2"],
        port=unused_port(),
        replicas=2,
        replica_cpus=0.5,
        request_timeout_s=REQUEST_TIMEOUT_S,
        batch_wait_s=0.2,  # each replica holds requests most of the time
    )
    cli_config = tmp_path / "cli.yaml"
    cli_config.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "serve"}))
    queries_file = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    out = tmp_path / "reference.jsonl"
    result = invoke("query", cli_config, "--queries", queries_file, "--top-k", 5, "--out", out)
    assert result.exit_code == 0, result.output
    reference = read_jsonl(out)
    port = raw["serve"]["port"]

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level="ERROR")
    from engine.config import parse_config
    from engine.serving.service import start_service, stop_service

    try:
        start_service(parse_config(raw))
        victims = replica_pids()
        assert len(victims) == 2, f"expected two replica workers, found {victims}"
        stop = threading.Event()
        answered_once = threading.Barrier(CLIENTS + 1)

        def client(number: int) -> list[Seen]:
            seen = []
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S + 15)
            first = True
            while not stop.is_set():
                seen.append(post(connection, (number + len(seen)) % len(QUERIES)))
                if first:
                    first = False
                    answered_once.wait(timeout=120)
            connection.close()
            return seen

        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, n) for n in range(CLIENTS)]
            answered_once.wait(timeout=120)
            time.sleep(1)
            os.kill(victims[0], signal.SIGKILL)
            killed_at = time.monotonic()
            deadline = killed_at + 120
            while time.monotonic() < deadline and (running_replicas() < 2 or len(replica_pids()) < 2):
                time.sleep(0.5)
            recovered_s = time.monotonic() - killed_at
            time.sleep(2)  # load on the new replica too
            stop.set()
            seen = [item for future in futures for item in future.result(timeout=REQUEST_TIMEOUT_S + 60)]

        statuses = Counter(item.status for item in seen)
        slowest = max(item.seconds for item in seen)
        print(
            f"\nclients saw: {dict(sorted(statuses.items()))} over {len(seen)} requests; slowest "
            f"{slowest:.2f} s; replica back (Serve RUNNING 2) {recovered_s:.1f} s after the kill"
        )
        for item in seen:
            if item.status not in (200, 503):
                print("not clean:", item.status, item.body)
        wrong = []
        for item in seen:
            if item.status == 200:
                try:
                    assert_same_records(item.body["results"], [dict(reference[item.query], query=0, id="0")])
                except AssertionError:
                    wrong.append(item)
            elif item.status == 503:
                assert item.retry_after is not None and int(item.retry_after) >= 1, item
                assert set(item.body) >= {"error"} and isinstance(item.body["error"], str), item.body
        assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[0]}"
        assert set(statuses) <= {200, 503}, statuses
        assert slowest < REQUEST_TIMEOUT_S + 5
        assert recovered_s < 120, "Serve did not bring a second replica back within 2 minutes"
        assert running_replicas() == 2
        assert len(replica_ids_answering(port)) == 2
    finally:
        stop_service()
        ray.shutdown()
