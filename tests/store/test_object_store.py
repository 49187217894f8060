"""The store at a URL: file:// and an S3-compatible object store (moto's server on loopback).

For each URL: an index whose driver is killed mid-run resumes and redoes only the unfinished shards,
the finished store equals the single-process local store bitwise, `tributary query` gives the same
scores, `tributary info --verify` is clean, and the object-store credentials (taken from the usual
AWS_* environment variables) appear nowhere: not in the manifest, not in any command's output, not in
any object written.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest

from engine.config import parse_config
from engine.local_or_ray import run_index
from engine.store import GradientStore, location
from engine.store.lock import LOCK_SUFFIX
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import assert_same_store, run_cli, store_config, store_contents, write_config
from tests.ports import unused_port
from tests.requirements import require

require("s3fs")
moto_server = require("moto.server")

KEY_ID = "tributary-test-key-ID"
SECRET = "tributary-test-SECRET-value"
BUCKET = "tributary-test-bucket"
TRAIN = SENTENCES + [
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the fox eats berries in the forest",
    "a crow eats seeds in the meadow",
]  # 4 shards of 3
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 on 127.0.0.1; credentials and endpoint only in the environment (inherited by the CLI)."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines from the server
    port = unused_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "FSSPEC_S3"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/tributary-aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/tributary-aws-credentials")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_jsonl(path, [{"id": f"r{i:02d}", "text": text} for i, text in enumerate(TRAIN)])


@pytest.fixture(scope="module")
def queries_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("queries") / "queries.jsonl"
    return write_jsonl(path, [{"text": text} for text in TRAIN[:4]])


@pytest.fixture(scope="module")
def reference(tiny_models, train_file, queries_file, tmp_path_factory):
    """The single-process store at a local path (one torch thread, as the CLI runs below) and the
    scores `tributary query` gives against it."""
    import torch

    root = tmp_path_factory.mktemp("reference")
    path = str(root / "store.zarr")
    raw = store_config(tiny_models["gpt2"], train_file, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_index(parse_config(raw), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    config = write_config(root / "job.yaml", raw)
    scores = root / "scores.npy"
    queried = run_cli(
        "query", str(config), "--queries", str(queries_file), "--scores-out", str(scores), env=SINGLE_THREAD
    )
    assert queried.returncode == 0, queried.stderr
    return {"path": path, "scores": np.load(scores)}


def _objects(kind: str, url: str) -> dict[str, bytes]:
    """Every object the run left at (and beside) the store: bucket objects, or files under the directory."""
    if kind == "s3":
        import boto3

        client = boto3.client("s3")
        keys = [
            entry["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for entry in page.get("Contents", [])
        ]
        return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}
    local = location.local_path(url)
    assert local is not None, f"{kind} store {url} is not on the local file system"
    root = Path(local).parent
    return {str(path): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def _assert_no_credentials(text: str, where: str) -> None:
    assert SECRET not in text, f"the secret access key appears in {where}"
    assert KEY_ID not in text, f"the access key id appears in {where}"


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_store_at_url_indexes_resumes_and_queries(
    kind, s3_endpoint, tiny_models, train_file, queries_file, reference, tmp_path
):
    url = f"s3://{BUCKET}/{tmp_path.name}/store.zarr" if kind == "s3" else (tmp_path / "out" / "store.zarr").as_uri()
    assert url.startswith(("s3://", "file:///"))
    config = write_config(tmp_path / "job.yaml", store_config(tiny_models["gpt2"], train_file, url))
    outputs = []

    # (a) the driver is killed after two gradient shards, then a second run resumes
    killed = run_cli(
        "index", str(config), "--no-progress", env={"TRIBUTARY_CHAOS": "driver:gradients:2", **SINGLE_THREAD}
    )
    outputs.append(killed)
    assert killed.returncode == -9, killed.stderr
    manifest = GradientStore.open(url).manifest
    assert not manifest.complete and len(manifest.completed_shards) == 2
    first = set(manifest.runs[0].computed["gradients"])
    assert len(first) == 2
    assert location.exists(url + LOCK_SUFFIX), "the killed run leaves its (now stale) lock behind"

    resumed = run_cli("index", str(config), "--no-progress", env=dict(SINGLE_THREAD, COLUMNS="400"))
    outputs.append(resumed)
    assert resumed.returncode == 0, resumed.stderr
    assert "its process is gone" in " ".join(resumed.stderr.split()), "the stale lock is taken over, with a warning"
    manifest = GradientStore.open(url).manifest
    assert manifest.complete and len(manifest.runs) == 2
    assert sorted(manifest.runs[1].computed["gradients"]) == sorted(set(range(4)) - first), (
        "only the unfinished shards are redone"
    )
    assert manifest.config["store"]["path"] == url
    assert not location.exists(url + LOCK_SUFFIX), "a finished index leaves no lock"

    # (b) the same store as the single-process run at a local path
    assert_same_store(store_contents(url), store_contents(reference["path"]))

    # (c) query against the URL store: the same scores as against the local store
    scores = tmp_path / "scores.npy"
    queried = run_cli(
        "query", str(config), "--queries", str(queries_file), "--scores-out", str(scores), env=SINGLE_THREAD
    )
    outputs.append(queried)
    assert queried.returncode == 0, queried.stderr
    assert np.array_equal(np.load(scores), reference["scores"])

    # (d) info --verify is clean
    info = run_cli("info", url, "--verify")
    outputs.append(info)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["complete"] and summary["runs"] == 2
    assert summary["verify"] == {"shards_checked": 4, "problems": []}

    # (e) credentials appear nowhere: manifest, command output, stored objects
    _assert_no_credentials(json.dumps(GradientStore.open(url).group.attrs.asdict()), "the store's attributes")
    for result in outputs:
        _assert_no_credentials(result.stdout + result.stderr, f"the output of {' '.join(result.args[3:5])}")
    objects = _objects(kind, url)
    assert any(name.endswith("grads/c/3/0") for name in objects), sorted(objects)
    for name, data in objects.items():
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, f"credentials stored in {name}"


def test_missing_store_at_url_is_named_without_credentials(s3_endpoint):
    url = f"s3://{BUCKET}/nowhere/store.zarr"
    assert not GradientStore.exists(url)
    missing = run_cli("info", url)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and url in " ".join(missing.stderr.split())
    _assert_no_credentials(missing.stdout + missing.stderr, "the error for a missing store")


def test_second_writer_at_s3_url_is_refused_naming_the_owner(s3_endpoint):
    import os

    from engine.errors import TributaryError
    from engine.store.lock import StoreLock

    url = f"s3://{BUCKET}/locked/store.zarr"
    with StoreLock(url):
        assert location.exists(url + LOCK_SUFFIX)
        with pytest.raises(TributaryError, match=f"host {socket.gethostname()} pid {os.getpid()}.*--break-lock"):
            StoreLock(url).acquire()
    assert not location.exists(url + LOCK_SUFFIX)


@pytest.fixture
def fake_instance_metadata():
    """A stand-in for the EC2 instance-metadata service on loopback, recording every request boto makes."""
    import http.server
    import threading

    requests: list[str] = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            requests.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.end_headers()

        do_GET = do_PUT = _answer

        def log_message(self, *_) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"endpoint": f"http://127.0.0.1:{server.server_address[1]}", "requests": requests}
    finally:
        server.shutdown()


@pytest.mark.parametrize("metadata_setting", [None, "false"])
def test_no_credentials_fail_fast_without_asking_instance_metadata(
    s3_endpoint, fake_instance_metadata, monkeypatch, metadata_setting
):
    """No credentials anywhere: a clear error, and the metadata service is only asked when the user
    said so (AWS_EC2_METADATA_DISABLED=false, e.g. on EC2 with an instance role)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake_instance_metadata["endpoint"])
    if metadata_setting is not None:
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", metadata_setting)
    url = f"s3://{BUCKET}/no-credentials/store.zarr"
    refused = run_cli("info", url, env={"COLUMNS": "400"}, timeout=120)
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert url in message and "no AWS credentials" in message and "AWS_ACCESS_KEY_ID" in message, message
    if metadata_setting is None:
        assert fake_instance_metadata["requests"] == [], "boto asked the instance-metadata service"
    else:
        assert fake_instance_metadata["requests"], "the user's AWS_EC2_METADATA_DISABLED=false was not honoured"
