"""Bad files and places, through the real CLI (`python -m engine.cli`, as a user runs it): bytes that are
not UTF-8, store paths that cannot be written, unreadable weights, a damaged zarr.json, a directory or a
device where a file belongs. Each is exit code 2 with one `error:` line naming the path, no traceback,
and nothing written — no store, no lock, no results, no stray files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import ROOT, run_cli


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def index_config(tmp_path: Path, model: Path, train: Path, store: str | None = None, **sections) -> Path:
    raw = job_config(tmp_path, model, train, curvature={"strategy": "identity"}, method={"name": "grad_dot"})
    if store is not None:
        raw["store"]["path"] = store
    for section, values in sections.items():
        raw[section] = dict(raw.get(section, {}), **values)
    return write_config(tmp_path / "job.yaml", raw)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with a file's bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_clean_failure(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, no traceback, and exactly one `error:` line that holds every expected text."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def assert_no_store(store: str) -> None:
    assert not os.path.lexists(store), f"{store} was created"
    assert not os.path.lexists(store + ".lock"), f"{store}.lock was left behind"


@pytest.fixture
def train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory) -> Path:
    """A complete store and the config it was indexed with (built in this process: only the failures
    under test need the real CLI)."""
    from engine.config import load_config
    from engine.local_or_ray import run_index

    root = tmp_path_factory.mktemp("bad_paths_store")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = index_config(root, tiny_models["gpt2"], train)
    run_index(load_config(str(config)), show_progress=False)
    return config


def store_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["store"]["path"])


# ---- bytes that are not UTF-8 -----------------------------------------------------------------------


def undecodable_file(path: Path) -> tuple[Path, int]:
    """A JSONL file whose third line (after a CRLF line and a blank one) holds a Latin-1 byte; returns
    (path, byte offset of that byte in the file)."""
    content = (
        b'{"id": "a", "text": "the fox eats berries"}\r\n'
        + b"\r\n"
        + b'{"id": "b", "text": "the owl eats caf\xe9 mice"}\n'
        + b'{"id": "c", "text": "a bear eats honey"}\n'
    )
    path.write_bytes(content)
    return path, content.index(b"\xe9")


def test_training_file_not_utf8_names_line_and_offset(tiny_models, tmp_path):
    train, offset = undecodable_file(tmp_path / "train.jsonl")
    config = index_config(tmp_path, tiny_models["gpt2"], train)
    before = snapshot(tmp_path)
    result = run_cli("index", str(config), "--no-progress")
    assert_clean_failure(result, f"{train}:3:", "not valid UTF-8", f"byte offset {offset}", "0xe9")
    assert snapshot(tmp_path) == before
    assert_no_store(str(tmp_path / "store.zarr"))


@pytest.mark.parametrize("generate", [False, True], ids=["scored", "generate"])
def test_query_file_not_utf8_names_line_and_offset(generate, built, tmp_path):
    queries, offset = undecodable_file(tmp_path / "queries.jsonl")
    if generate:  # read by engine/query/generate.py read_prompts: prompt rows
        content = queries.read_bytes().replace(b'"text"', b'"prompt"')
        queries.write_bytes(content)
        offset = content.index(b"\xe9")
    store_before = snapshot(store_of(built))
    before = snapshot(tmp_path)
    args = ["query", str(built), "--queries", str(queries), "--out", str(tmp_path / "results.jsonl")]
    result = run_cli(*args, *(["--generate", "--max-new-tokens", "2"] if generate else []))
    assert_clean_failure(result, f"{queries}:3:", "not valid UTF-8", f"byte offset {offset}")
    assert snapshot(tmp_path) == before
    assert snapshot(store_of(built)) == store_before


# ---- where the store goes ----------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["/proc/tributary-test.zarr", "/sys/tributary-test.zarr"])
def test_store_on_a_file_system_that_takes_no_files(store, tiny_models, train, tmp_path):
    if not os.path.isdir(os.path.dirname(store)):
        pytest.skip(f"no {os.path.dirname(store)} here")
    config = index_config(tmp_path, tiny_models["gpt2"], train, store=store)
    before = snapshot(tmp_path)
    result = run_cli("index", str(config), "--no-progress")
    assert_clean_failure(result, f"store.path {store}", "cannot be written")
    assert_no_store(store)
    assert snapshot(tmp_path) == before


def _read_only_runner(directory: Path) -> list[str] | None:
    """A command prefix under which `directory` is read-only, for root too: a private read-only bind
    mount (gone when the command ends); for a user who is not root, taking away write permission does."""
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'  # $0: the directory
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(directory)]
    if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    return None


@pytest.mark.parametrize("nested", [False, True], ids=["in it", "folders below it"])
def test_store_in_a_directory_nobody_may_write(nested, tiny_models, train, tmp_path):
    locked = tmp_path / "read-only"
    locked.mkdir()
    store = str(locked / "a" / "b" / "store.zarr") if nested else str(locked / "store.zarr")
    prefix = _read_only_runner(locked)
    if prefix is None:
        pytest.skip("running as root without user namespaces: no directory here is read-only to root")
    config = index_config(tmp_path, tiny_models["gpt2"], train, store=store)
    before = snapshot(tmp_path)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "engine.cli", "index", str(config), "--no-progress"],
            cwd=ROOT,
            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        locked.chmod(0o755)
    assert_clean_failure(result, f"store.path {store}", "cannot be written", str(locked))
    assert snapshot(tmp_path) == before
    assert_no_store(store)


def test_store_path_under_a_regular_file(tiny_models, train, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    store = str(blocker / "x.zarr")
    config = index_config(tmp_path, tiny_models["gpt2"], train, store=store)
    before = snapshot(tmp_path)
    result = run_cli("index", str(config), "--no-progress")
    line = assert_clean_failure(result, f"store.path {store}", f"{blocker}, which is a file")
    assert "being written by" not in line
    assert snapshot(tmp_path) == before


# ---- model weights -----------------------------------------------------------------------------------


def _garbage(weights: Path) -> None:
    weights.write_bytes(bytes(range(256)) * 8)


def _truncated(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:-100])


def _directory(weights: Path) -> None:
    weights.unlink()
    weights.mkdir()
    (weights / "part0").write_bytes(b"\0" * 16)


DAMAGED_WEIGHTS = {"garbage bytes": _garbage, "truncated": _truncated, "a directory": _directory}


def damaged_model(model: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    assert weights.is_file(), "the tiny model is saved as safetensors"
    damage(weights)
    return copy, weights


@pytest.mark.parametrize("damage", list(DAMAGED_WEIGHTS))
def test_unreadable_weights_under_index(damage, tiny_models, train, tmp_path):
    model, weights = damaged_model(tiny_models["gpt2"], tmp_path, DAMAGED_WEIGHTS[damage])
    config = index_config(tmp_path, model, train)
    before = snapshot(tmp_path)
    result = run_cli("index", str(config), "--no-progress")
    assert_clean_failure(result, f"model.path {model}", str(weights))
    assert snapshot(tmp_path) == before
    assert_no_store(str(tmp_path / "store.zarr"))


def test_unreadable_weights_are_refused_before_ray_starts(tiny_models, train, tmp_path):
    """With a cluster the model loads in the workers; the weights are checked in the driver first, so
    the error is the same one line and no store or lock appears while workers start."""
    model, weights = damaged_model(tiny_models["gpt2"], tmp_path, _garbage)
    config = index_config(tmp_path, model, train, cluster={"address": "local", "workers": 1, "local_cpus": 1})
    before = snapshot(tmp_path)
    result = run_cli("index", str(config), "--no-progress")
    assert_clean_failure(result, f"model.path {model}", str(weights), "cannot be read")
    assert snapshot(tmp_path) == before


def test_unreadable_weights_under_query(built, tmp_path):
    raw = yaml.safe_load(built.read_text())
    model, _ = damaged_model(Path(raw["model"]["path"]), tmp_path, _garbage)
    raw["model"]["path"] = str(model)
    config = write_config(tmp_path / "job.yaml", raw)
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": "q", "text": SENTENCES[1]}])
    before = snapshot(tmp_path)
    result = run_cli("query", str(config), "--queries", str(queries), "--out", str(tmp_path / "results.jsonl"))
    assert_clean_failure(result, f"model.path {model}", "weights cannot be loaded", "SafetensorError")
    assert snapshot(tmp_path) == before


# ---- a damaged store -----------------------------------------------------------------------------------

DAMAGED_METADATA = {
    "cut short": b'{"zarr_format": 3, "node_type": "gro',
    "not UTF-8": b'{"zarr_format": 3, "node_type": "group", "attributes": {"x": "\xff"}}',
    "attributes not an object": b'{"zarr_format": 3, "node_type": "group", "attributes": []}',
}


@pytest.mark.parametrize("damage", list(DAMAGED_METADATA))
def test_damaged_zarr_json_under_info(damage, built, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(store_of(built), store)
    (store / "zarr.json").write_bytes(DAMAGED_METADATA[damage])
    before = snapshot(tmp_path)
    result = run_cli("info", str(store))
    assert_clean_failure(result, f"{store / 'zarr.json'} cannot be read", "damaged")
    assert result.stdout == ""
    assert snapshot(tmp_path) == before


def test_damaged_zarr_json_under_query(built, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(store_of(built), store)
    (store / "zarr.json").write_bytes(DAMAGED_METADATA["cut short"])
    raw = yaml.safe_load(built.read_text())
    raw["store"]["path"] = str(store)
    config = write_config(tmp_path / "job.yaml", raw)
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": "q", "text": SENTENCES[1]}])
    before = snapshot(tmp_path)
    result = run_cli("query", str(config), "--queries", str(queries), "--out", str(tmp_path / "results.jsonl"))
    assert_clean_failure(result, f"{store / 'zarr.json'} cannot be read")
    assert snapshot(tmp_path) == before


# ---- a directory or a device where a file belongs -------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_training_file_that_is_a_directory_or_a_device(kind, tiny_models, tmp_path):
    if kind == "directory":
        train, said = tmp_path / "data", "is a directory"
        train.mkdir()
    else:
        train, said = Path("/dev/null"), "is not a regular file"
    config = index_config(tmp_path, tiny_models["gpt2"], train)
    before = snapshot(tmp_path)
    result = run_cli("index", str(config), "--no-progress")
    line = assert_clean_failure(result, f"data.train {train} {said}", "JSONL file")
    assert "does not exist" not in line
    assert snapshot(tmp_path) == before
    assert_no_store(str(tmp_path / "store.zarr"))


def test_query_file_that_is_a_directory(built, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    before = snapshot(tmp_path)
    result = run_cli("query", str(built), "--queries", str(queries), "--out", str(tmp_path / "results.jsonl"))
    assert_clean_failure(result, f"queries file {queries} is a directory")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("out", ["/proc/x", "/proc/no/such/results.jsonl"])
def test_query_results_to_an_unwritable_place(built, tmp_path, out):
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": "q", "text": SENTENCES[0]}])
    before = snapshot(tmp_path)
    result = run_cli("query", str(built), "--queries", str(queries), "--out", out)
    assert_clean_failure(result, f"cannot write {out}")
    assert snapshot(tmp_path) == before
    assert not os.path.lexists(out + ".part")


# ---- order: inputs are checked before the writer lock is taken -----------------------------------------


def test_bad_inputs_are_reported_before_the_lock(tiny_models, train, tmp_path):
    """A live writer holds the store's lock: a run with bad weights or bad bytes still reports the bad
    input, not the lock (it never reached the lock), and leaves the other writer's lock as it was."""
    import json
    import socket
    import time

    store = tmp_path / "store.zarr"
    lock = Path(str(store) + ".lock")
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "user": "other", "started": time.time(), "token": "x"}
    lock.write_text(json.dumps(owner))
    model, weights = damaged_model(tiny_models["gpt2"], tmp_path, _truncated)
    bad_train, offset = undecodable_file(tmp_path / "bad.jsonl")
    cases = [
        (index_config(tmp_path, model, train).rename(tmp_path / "weights.yaml"), [str(weights)]),
        (index_config(tmp_path, tiny_models["gpt2"], bad_train), [f"{bad_train}:3:", f"byte offset {offset}"]),
    ]
    for config, expected in cases:
        before = snapshot(tmp_path)
        result = run_cli("index", str(config), "--no-progress")
        line = assert_clean_failure(result, *expected)
        assert "being written by" not in line
        assert snapshot(tmp_path) == before
        assert not store.exists()


@pytest.mark.parametrize("toy", [True, False])
def test_demo_workdir_that_cannot_be_written_is_refused_in_one_line(tmp_path, toy):
    """Both demos refuse a --workdir under a regular file before loading anything: exit 2, one line naming it."""
    from typer.testing import CliRunner

    from engine.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    workdir = blocker / "demo"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *(["--toy"] if toy else [])])
    assert result.exit_code == 2, result.output
    assert f"--workdir {workdir}: cannot create or write it" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # typer.Exit(2), not an OSError
    assert blocker.read_text() == "not a folder"
