"""One writer per store: a second writer is refused, naming the owner; stale and foreign locks.

The lock is `STORE.lock` beside the store (engine/store/lock.py documents the rules): a live lock is
never taken over; a lock from this host whose pid is gone is taken over with a warning; a lock from
another host is removed only with `tributary index --break-lock`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from engine.store import GradientStore
from engine.store.lock import LOCK_SUFFIX, StoreLock
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import run_cli, store_config, write_config

WIDE = {"COLUMNS": "400"}  # Rich wraps log lines at the terminal width; keep each message on one line


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_jsonl(path, [{"id": f"r{i}", "text": text} for i, text in enumerate(SENTENCES)])


@pytest.fixture(scope="module")
def built_store(tiny_models, train_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("built") / "store.zarr"
    run_index(parse_config(store_config(tiny_models["gpt2"], train_file, str(path))), show_progress=False)
    assert not Path(str(path) + LOCK_SUFFIX).exists(), "a finished index leaves no lock"
    return path


def _config(tmp_path: Path, tiny_models, train_file, store: Path) -> Path:
    return write_config(tmp_path / "job.yaml", store_config(tiny_models["gpt2"], train_file, str(store)))


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _lock_file(store: Path) -> Path:
    return Path(str(store) + LOCK_SUFFIX)


def _write_lock(store: Path, host: str, pid: int) -> dict:
    owner = {"host": host, "pid": pid, "user": "someone-else", "started": time.time() - 3600, "token": "by-hand"}
    _lock_file(store).write_text(json.dumps(owner))
    return owner


def _text(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())


def _assert_complete(store: Path) -> None:
    assert GradientStore.open(str(store)).manifest.complete
    assert not _lock_file(store).exists(), "a finished index leaves no lock"


def test_second_writer_is_refused_naming_the_owner(tiny_models, train_file, built_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(built_store, store)
    config = _config(tmp_path, tiny_models, train_file, store)
    before = _snapshot(store)
    lock = StoreLock(str(store))
    lock.acquire()
    try:
        held = _lock_file(store).read_text()
        assert json.loads(held)["pid"] == os.getpid()
        # --overwrite would replace the whole store: the lock must stop it before anything is touched
        refused = run_cli("index", str(config), "--no-progress", "--overwrite", env=WIDE)
        assert refused.returncode == 2, refused.stderr
        message = _text(refused)
        assert f"host {socket.gethostname()} pid {os.getpid()}" in message, message
        assert "is being written by" in message and "--break-lock" in message, message
        assert _snapshot(store) == before, "the refused run changed the store"
        assert _lock_file(store).read_text() == held, "the refused run touched the lock"
        with pytest.raises(TributaryError, match=f"pid {os.getpid()}"):
            StoreLock(str(store)).acquire()  # in-process too
    finally:
        lock.release()
    assert not _lock_file(store).exists()


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tiny_models, train_file, tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(finished.stdout)  # reaped by subprocess.run: no such process any more
    store = tmp_path / "store.zarr"
    _write_lock(store, socket.gethostname(), dead_pid)
    indexed = run_cli("index", str(_config(tmp_path, tiny_models, train_file, store)), "--no-progress", env=WIDE)
    assert indexed.returncode == 0, indexed.stderr
    message = _text(indexed)
    assert "WARNING" in message and f"pid {dead_pid}" in message and "its process is gone" in message, message
    _assert_complete(store)


def test_lock_from_another_host_needs_break_lock(tiny_models, train_file, tmp_path):
    store = tmp_path / "store.zarr"
    _write_lock(store, "other-host", os.getpid())  # a pid alive here means nothing on another host
    held = _lock_file(store).read_text()
    config = _config(tmp_path, tiny_models, train_file, store)

    refused = run_cli("index", str(config), "--no-progress", env=WIDE)
    assert refused.returncode == 2, refused.stderr
    message = _text(refused)
    assert "host other-host" in message and "user someone-else" in message and "--break-lock" in message, message
    assert not store.exists(), "the refused run created the store"
    assert _lock_file(store).read_text() == held

    broken = run_cli("index", str(config), "--no-progress", "--break-lock", env=WIDE)
    assert broken.returncode == 0, broken.stderr
    message = _text(broken)
    assert "WARNING" in message and "host other-host" in message and "--break-lock" in message, message
    _assert_complete(store)


CONTENDER = """
import json, os, sys, time
from pathlib import Path
from engine.errors import TributaryError
from engine.store.lock import StoreLock

store, role, signals = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def wait_for(name):
    deadline = time.monotonic() + 60
    while not (signals / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"{role}: no {name} signal")
        time.sleep(0.02)

if role == "slow":  # the forced delay: between reading the stale lock and acting on it
    judge = StoreLock._is_stale
    def delayed(self, owner):
        stale = judge(self, owner)
        if not (signals / "slow-read").exists():
            (signals / "slow-read").touch()
            wait_for("fast-done")
        return stale
    StoreLock._is_stale = delayed
else:
    wait_for("slow-read")

lock = StoreLock(store)
try:
    lock.acquire()
    outcome = {"acquired": True, "token": lock.owner["token"]}
except TributaryError as error:
    outcome = {"acquired": False, "error": str(error)}
(signals / f"{role}.json").write_text(json.dumps(outcome))
if role == "fast":
    (signals / "fast-done").touch()
wait_for("release")  # a holder stays alive (a live pid) until the test has looked
if outcome["acquired"]:
    lock.release()
"""


def test_two_writers_that_both_find_a_stale_lock_cannot_both_take_it(tmp_path):
    """The slow writer reads the stale lock, then waits while the fast one takes it over and writes its
    own; acting on its stale reading must not remove the fast writer's live lock."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = tmp_path / "store.zarr"
    _write_lock(store, socket.gethostname(), int(finished.stdout))
    signals = tmp_path / "signals"
    signals.mkdir()
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    contenders = {
        role: subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(store), role, str(signals)],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("slow", "fast")
    }
    try:
        deadline = time.monotonic() + 120
        while not all((signals / f"{role}.json").exists() for role in contenders):
            for role, process in contenders.items():
                assert process.poll() is None, f"{role} exited: {process.stderr.read() if process.stderr else ''}"
            assert time.monotonic() < deadline, "the contenders did not finish"
            time.sleep(0.05)
        outcomes = {role: json.loads((signals / f"{role}.json").read_text()) for role in contenders}
        winners = [role for role, outcome in outcomes.items() if outcome["acquired"]]
        assert len(winners) == 1, outcomes
        held = json.loads(_lock_file(store).read_text())
        assert held["token"] == outcomes[winners[0]]["token"], "the lock on disk is not the winner's"
        [loser] = set(contenders) - set(winners)
        assert "locked by" in outcomes[loser]["error"] or "being written by" in outcomes[loser]["error"]
    finally:
        (signals / "release").touch()
        for process in contenders.values():
            process.wait(timeout=60)
    assert not _lock_file(store).exists(), "the winner released its lock"
