"""`tributary serve` over real HTTP on loopback: the same results as `tributary query`, batching under 32
concurrent clients (scoring passes counted), refusals with the right status while the service keeps
answering, bearer-token auth, no token in any log, and a store that is never written.

One service (Ray Serve, a local cluster on loopback) runs for the whole module: starting it takes seconds.
Its config has a `cluster` section, so its scoring passes run on two shared row-range scorers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from engine.serving.auth import read_token, token_digest, token_matches
from engine.serving.batching import PassQueue
from engine.serving.client import AttributionClient, ServiceError
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.ports import unused_port
from tests.requirements import require
from tests.service_helpers import asgi_request, assert_same_records, read_jsonl

ray = require("ray")
require("ray.serve")

TOKEN = "tok-7f3a9c1e5b2d4068-never-logged"
WRONG_TOKEN = "tok-wrong-0000-also-never-logged"
MAX_QUERIES = 8
MAX_PROMPT_TOKENS = 12
MAX_BYTES = 16 * 1024
CLIENTS, ROUNDS = 32, 3
QUERIES = [{"prompt": prompt, "completion": " " + completion} for prompt, completion in PROMPTS]
GENERATE_PROMPTS = [{"prompt": "the fox eats"}, {"prompt": "a seal"}]


def store_snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Every file's sha256 and every file's and folder's mtime (a file created and removed again changes its
    folder's), keyed by path below the store."""
    return {
        str(entry.relative_to(path)): (
            hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "folder",
            entry.stat().st_mtime_ns,
        )
        for entry in sorted([path, *path.rglob("*")])
    }


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """A float64 store of the 8 training sentences (3 chunks), served with auth on, until the module ends."""
    root = tmp_path_factory.mktemp("serving")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train, store={"rows_per_chunk": 3})
    run_index(parse_config(raw), show_progress=False)
    (root / "token").write_text(TOKEN + "\n")
    cli_config = root / "cli.yaml"
    cli_config.write_text(yaml.safe_dump(raw))
    raw["cluster"] = {"address": "local", "workers": 2, "cpus_per_worker": 1}
    raw["serve"] = {
        "port": unused_port(),
        "replica_cpus": 0.5,
        "auth_token_file": str(root / "token"),
        "max_queries_per_request": MAX_QUERIES,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_request_bytes": MAX_BYTES,
        "batch_max_queries": 64,
        "batch_wait_s": 0.02,
    }
    store = Path(raw["store"]["path"])
    before = store_snapshot(store)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level="ERROR")
    from engine.serving.service import start_service, stop_service

    try:
        url = start_service(parse_config(raw))
        yield {"url": url, "cli_config": cli_config, "root": root, "store": store, "before": before}
    finally:
        stop_service()
        ray.shutdown()


@pytest.fixture
def client(served):
    with AttributionClient(served["url"], token=TOKEN, timeout=60) as connected:
        yield connected


def cli_records(served, name: str, rows: list[dict], *options) -> list[dict]:
    """`tributary query` on the same store, model and queries, scoring in its own process (the service's
    passes run on the shared row-range scorers, so the comparison also checks the sharding)."""
    queries = write_jsonl(served["root"] / f"{name}.jsonl", rows)
    out = served["root"] / f"{name}.results.jsonl"
    result = invoke("query", served["cli_config"], "--queries", queries, "--top-k", 5, "--out", out, *options)
    assert result.exit_code == 0, result.output
    return read_jsonl(out)


@pytest.fixture(scope="module")
def reference(served):
    return cli_records(served, "queries", QUERIES)


# ---- results --------------------------------------------------------------------------------------


def test_results_equal_tributary_query(served, client, reference):
    assert_same_records(client.attribute(QUERIES, top_k=5), reference)
    assert reference[0]["top_k"][0]["snippet"] in SENTENCES


def test_method_and_generate_equal_tributary_query(served, client):
    cosine = cli_records(served, "cosine", QUERIES[:2], "--method", "grad_cos", "--measurement", "margin")
    assert_same_records(client.attribute(QUERIES[:2], top_k=5, method="grad_cos", measurement="margin"), cosine)
    generated = cli_records(served, "generated", GENERATE_PROMPTS, "--generate", "--max-new-tokens", 4)
    served_generated = client.attribute(GENERATE_PROMPTS, top_k=5, generate={"max_new_tokens": 4})
    assert all(record["generated"] for record in served_generated)
    assert_same_records(served_generated, generated)


def test_32_concurrent_clients_are_batched(served, reference):
    """Every answer is right, and the replica scored them in fewer passes than there were requests."""
    with AttributionClient(served["url"], token=TOKEN) as observer:
        before = observer.info()["replica"]
    start = threading.Barrier(CLIENTS)

    def run_client(number: int) -> list[tuple[int, list[dict]]]:
        answers = []
        with AttributionClient(served["url"], token=TOKEN, timeout=120) as own:
            start.wait(timeout=60)
            for round_ in range(ROUNDS):  # bounded: stops by itself
                which = (number + round_) % len(QUERIES)
                answers.append((which, own.attribute([QUERIES[which]], top_k=5)))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(run_client, range(CLIENTS), timeout=300))
    for answers in results:
        assert len(answers) == ROUNDS
        for which, records in answers:
            assert_same_records(records, [dict(reference[which], query=0, id="0")])
    with AttributionClient(served["url"], token=TOKEN) as observer:
        after = observer.info()["replica"]
    requests = after["requests"] - before["requests"]
    passes = after["scoring_passes"] - before["scoring_passes"]
    assert requests == CLIENTS * ROUNDS
    assert 0 < passes < requests, f"{passes} scoring passes for {requests} requests: no batching"
    assert after["batches"] - before["batches"] == passes


# ---- refusals -------------------------------------------------------------------------------------


def raw_post(served, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(served["url"].rsplit(":", 1)[1]), timeout=60)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("POST", "/v1/attribute", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def valid(**changes) -> dict:
    return dict({"queries": QUERIES[:1], "top_k": 3}, **changes)


BAD_REQUESTS = [
    # (body, status, field named, limit)
    (b'{"queries": [', 422, "body", None),
    (json.dumps({"top_k": 3}).encode(), 422, "queries", None),
    (json.dumps(valid(top_k="three")).encode(), 422, "top_k", None),
    (json.dumps(valid(top_k=0)).encode(), 422, "top_k", None),
    (json.dumps(valid(queries=[{"completion": " eats"}])).encode(), 422, "queries.0.prompt", None),
    (json.dumps(valid(queries=[{"prompt": "the fox"}])).encode(), 422, "queries.0.completion", None),
    (
        json.dumps(valid(queries=[{"prompt": "the fox", "completion": " eats", "color": 1}])).encode(),
        422,
        "queries.0.color",
        None,
    ),
    (json.dumps(valid(queries=[])).encode(), 422, "queries", None),
    (json.dumps(valid(top_k=1000)).encode(), 422, "top_k", 100),
    (json.dumps(valid(queries=QUERIES[:1] * (MAX_QUERIES + 1))).encode(), 413, "queries", MAX_QUERIES),
    (
        json.dumps(valid(queries=[{"prompt": " ".join(["the"] * 20), "completion": " fox"}])).encode(),
        413,
        "queries.0.prompt",
        MAX_PROMPT_TOKENS,
    ),
    (
        json.dumps(valid(queries=[{"prompt": "the " * 3000, "completion": " fox"}])).encode(),
        413,
        "queries.0.prompt",
        8000,
    ),
    (json.dumps(valid(padding="x" * MAX_BYTES)).encode(), 413, "body", MAX_BYTES),
    (json.dumps(valid(method="tracin-of-dreams")).encode(), 400, "method", None),
    (json.dumps(valid(method="source")).encode(), 400, "method", None),  # known, but the config has no eta/steps
    (json.dumps(valid(measurement="entropy")).encode(), 400, "measurement", None),
]


def test_bad_requests_are_refused_and_the_service_keeps_answering(served, client, reference):
    for body, status, field, limit in BAD_REQUESTS:
        got, answer = raw_post(served, body)
        assert got == status, (body[:80], answer)
        assert answer["error"] and "Traceback" not in answer["error"]
        assert answer.get("field", "").startswith(field), (body[:80], answer)
        if limit is not None:
            assert answer["limit"] == limit and str(limit) in answer["error"]
        assert_same_records(client.attribute(QUERIES[:1], top_k=5), reference[:1])
    assert client.health() == {"status": "ok"}


def test_client_raises_with_the_service_error(client):
    with pytest.raises(ServiceError) as caught:
        client.attribute(QUERIES[:1], method="tracin-of-dreams")
    assert caught.value.status == 400 and "grad_dot" in caught.value.body["error"]


def raw_request(served, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict[str, str]]:
    """Status, JSON body and headers of one request with the right token."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(served["url"].rsplit(":", 1)[1]), timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}"), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def assert_error_shape(answer: dict) -> None:
    """The documented refusal: {error, field?, limit?} and nothing else (no FastAPI `detail`)."""
    assert isinstance(answer.get("error"), str) and answer["error"], answer
    assert set(answer) <= {"error", "field", "limit"}, answer
    assert "Traceback" not in answer["error"]


UNPARSABLE_BODIES = {
    "invalid UTF-8": b'{"queries": [{"prompt": "the fox \xff\xfe", "completion": " eats"}], "top_k": 3}',
    "nested 6000 deep": b"[" * 6000 + b"]" * 6000,  # under the 16 KiB body limit, past any JSON recursion limit
    "a truncated UTF-8 sequence": b'{"queries": [{"prompt": "the fox \xe2\x82", "completion": " eats"}]}',
}


@pytest.mark.parametrize("name", list(UNPARSABLE_BODIES))
def test_a_body_that_does_not_parse_is_refused_with_422_in_the_error_shape(served, client, reference, name):
    status, answer = raw_post(served, UNPARSABLE_BODIES[name])
    assert status == 422, (name, answer)
    assert_error_shape(answer)
    assert answer.get("field") == "body", answer
    assert_same_records(client.attribute(QUERIES[:1], top_k=5), reference[:1])


def test_unknown_paths_and_methods_are_refused_in_the_error_shape(served):
    for method, path, expected in (
        ("GET", "/v1/nothing-here", 404),
        ("GET", "/v1/attribute", 405),
        ("POST", "/v1/health", 405),
    ):
        status, answer, headers = raw_request(served, method, path, b"{}" if method == "POST" else None)
        assert status == expected, (method, path, answer)
        assert_error_shape(answer)
        if expected == 405:
            assert "allow" in headers, headers  # the allowed methods are still named


def test_the_api_answers_in_the_error_shape_at_the_default_body_limit():
    """The API alone, around a stand-in service: the issue's 50,000-deep body under the default 1 MiB
    limit, and an unexpected failure (a bug) answered 500 in the same shape."""
    from types import SimpleNamespace

    from engine.serving.app import build_api

    def broken_info() -> dict:
        raise KeyError("a bug")

    async def never_called(request) -> dict:
        raise AssertionError("a body that does not parse reached the endpoint")

    service = SimpleNamespace(
        limits=SimpleNamespace(max_request_bytes=1 << 20), _digest=None, info=broken_info, attribute=never_called
    )
    api = build_api(service)  # type: ignore[arg-type]
    status, answer = asgi_request(api, "POST", "/v1/attribute", b"[" * 50_000 + b"]" * 50_000)
    assert status == 422 and answer.get("field") == "body", answer
    assert_error_shape(answer)
    status, answer = asgi_request(api, "GET", "/v1/info")
    assert status == 500, answer
    assert_error_shape(answer)
    assert "KeyError" in answer["error"]


# ---- access ---------------------------------------------------------------------------------------


def test_bearer_token_auth(served):
    url = served["url"]
    for token, expected in ((None, 401), (WRONG_TOKEN, 401), (TOKEN[:-1], 401), (TOKEN, 200)):
        with AttributionClient(url, token=token) as user:
            assert user.request("GET", "/v1/health")[0] == 200  # health never needs a token
            for method, path in (("GET", "/v1/info"), ("GET", "/openapi.json"), ("GET", "/docs")):
                status, _ = user.request(method, path)
                assert status == expected, (token, path)
        assert raw_post(served, json.dumps(valid()).encode(), token=token)[0] == expected
    with AttributionClient(url) as anonymous:  # a token in another scheme is no bearer token
        anonymous._headers["Authorization"] = f"Basic {TOKEN}"
        assert anonymous.request("GET", "/v1/info")[0] == 401


def test_openapi_and_info(client, served):
    document = client.openapi()
    assert {"/v1/attribute", "/v1/health", "/v1/info"} <= set(document["paths"])
    schemas = document["components"]["schemas"]
    assert {"queries", "top_k", "method", "generate"} <= set(schemas["AttributeRequest"]["properties"])
    info = client.info()
    assert info["store"]["rows"] == len(SENTENCES) and info["store"]["complete"] is True
    assert {"if", "grad_dot", "grad_cos", "source"} <= set(info["methods"]["available"])
    assert info["limits"]["max_queries_per_request"] == MAX_QUERIES
    assert info["batching"]["row_ranges"] == 2
    assert TOKEN not in json.dumps(info)


def test_token_never_appears_in_logs(served, capfd):
    with AttributionClient(served["url"], token=WRONG_TOKEN) as wrong:
        assert wrong.request("GET", "/v1/info")[0] == 401
    with AttributionClient(served["url"], token=TOKEN) as right:
        assert right.request("GET", "/v1/info")[0] == 200
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [file for file in session.rglob("*") if file.is_file() and file.suffix in (".log", ".out", ".err")]
    texts = [file.read_text(errors="replace") for file in logs]
    assert any("/v1/info 401" in text for text in texts), "the replica's access log was not found"
    captured = capfd.readouterr()
    for secret in (TOKEN, WRONG_TOKEN):
        assert secret not in captured.out + captured.err
        assert not [file.name for file, text in zip(logs, texts) if secret in text]


# ---- the pass queue (no service needed) -------------------------------------------------------------


def test_pass_queue_puts_everything_that_waited_into_the_next_pass():
    """While a pass runs, arrivals wait; the next pass takes them all, up to max_size, skipping abandoned ones."""
    first_pass_running, release = threading.Event(), threading.Event()
    passes: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        passes.append(list(items))
        if len(passes) == 1:
            first_pass_running.set()
            assert release.wait(10)
        return [10 * item for item in items]

    async def scenario():
        queue = PassQueue(run, size=lambda item: 3 if item == 4 else 1, max_size=4, wait_s=0.0)
        first = asyncio.create_task(queue.submit(0))
        assert await asyncio.to_thread(first_pass_running.wait, 10)
        waiting = {item: asyncio.create_task(queue.submit(item)) for item in range(1, 8)}
        await asyncio.sleep(0.05)
        waiting.pop(2).cancel()  # gave up (a timeout): never scored
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, *waiting.values())

    results = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert results == [0, 10, 30, 40, 50, 60, 70]
    # sizes: item 4 counts 3, the others 1; at most 4 per pass, arrival order kept
    assert passes == [[0], [1, 3], [4, 5], [6, 7]]


def test_pass_queue_reports_a_failed_pass_and_keeps_going():
    calls = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return items

    async def scenario():
        queue = PassQueue(run, size=lambda item: 1, max_size=8, wait_s=0.0)
        with pytest.raises(RuntimeError, match="disk on fire"):
            await queue.submit(1)
        return await queue.submit(2)

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == 2


# ---- config and start-up (no service needed) --------------------------------------------------------


def test_token_from_environment_or_file(tmp_path, monkeypatch, tiny_models, text_train):
    base = job_config(tmp_path, tiny_models["gpt2"], text_train)
    monkeypatch.setenv("TRIBUTARY_TEST_TOKEN", " from-env \n")
    from_env = parse_config(dict(base, serve={"auth_token_env": "TRIBUTARY_TEST_TOKEN"})).serve
    assert read_token(from_env) == "from-env"
    monkeypatch.delenv("TRIBUTARY_TEST_TOKEN")
    with pytest.raises(TributaryError, match="TRIBUTARY_TEST_TOKEN"):
        read_token(from_env)
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(TributaryError, match="empty"):
        read_token(parse_config(dict(base, serve={"auth_token_file": str(empty)})).serve)
    assert read_token(parse_config(base).serve) is None
    with pytest.raises(TributaryError, match="not both"):
        parse_config(dict(base, serve={"auth_token_env": "A", "auth_token_file": str(empty)}))
    with pytest.raises(TributaryError, match="batch_max_queries"):
        parse_config(dict(base, serve={"max_queries_per_request": 10, "batch_max_queries": 5}))


def test_token_comparison():
    digest = token_digest("abc")
    assert token_matches(b"Bearer abc", digest) and token_matches(b"bearer  abc ", digest)
    for header in (None, b"", b"Bearer ab", b"Bearer abcd", b"Basic abc", b"abc"):
        assert not token_matches(header, digest)


def test_serve_refuses_a_missing_store_before_starting(tmp_path, tiny_models, text_train):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(job_config(tmp_path, tiny_models["gpt2"], text_train)))
    assert_clean_failure(invoke("serve", config, "--port", unused_port()), "does not exist", "tributary index")


def test_the_store_was_never_written(served, client):
    """Answers, generations, refusals and failed auth (sent here, and by any test before, in any order) leave
    the served store byte for byte and mtime for mtime as it was before the service started."""
    assert len(client.attribute(QUERIES, top_k=5)) == len(QUERIES)
    assert client.attribute(GENERATE_PROMPTS[:1], top_k=5, generate={"max_new_tokens": 2})[0]["generated"]
    for body, status, _, _ in BAD_REQUESTS:
        assert raw_post(served, body)[0] == status, body[:80]
    assert raw_post(served, json.dumps(valid()).encode(), token=WRONG_TOKEN)[0] == 401
    assert client.info()["store"]["complete"] is True
    assert store_snapshot(served["store"]) == served["before"]
