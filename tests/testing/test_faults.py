"""Test-only fault injection (engine.testing.faults): TRIBUTARY_CHAOS kills exactly the point it names, once for an
actor (its marker file lets the re-issued shard through), and reaches Ray workers through `forwarded()`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.testing import faults


@pytest.fixture
def kills(monkeypatch) -> list[tuple[int, int]]:
    """The os.kill calls fault_point makes, recorded instead of made."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: calls.append((pid, sig)))
    return calls


def test_unset_nothing_dies_and_nothing_is_forwarded(monkeypatch, kills):
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    for site, stage, number in [("actor", "gradients", 0), ("driver", "gradients", 1)]:
        faults.fault_point(site, stage, number)
    assert kills == [] and faults.forwarded() == {}


def test_an_actor_point_dies_once_at_its_stage_and_shard(monkeypatch, kills, tmp_path):
    marker = tmp_path / "marker"
    monkeypatch.setenv(faults.VARIABLE, f"actor:gradients:2:{marker}")
    for site, stage, number in [("actor", "gradients", 1), ("actor", "lambdas", 2), ("driver", "gradients", 2)]:
        faults.fault_point(site, stage, number)
    assert kills == [] and not marker.exists()
    faults.fault_point("actor", "gradients", 2)
    assert kills == [(os.getpid(), signal.SIGKILL)] and marker.read_text() == str(os.getpid())
    faults.fault_point("actor", "gradients", 2)  # the re-issued shard: the marker is there
    assert len(kills) == 1
    assert faults.forwarded() == {faults.VARIABLE: f"actor:gradients:2:{marker}"}


def test_a_driver_point_dies_after_its_commit_count(monkeypatch, kills):
    monkeypatch.setenv(faults.VARIABLE, "driver:projection:3")
    for number in (1, 2, 4):
        faults.fault_point("driver", "projection", number)
    faults.fault_point("driver", "gradients", 3)
    assert kills == []
    faults.fault_point("driver", "projection", 3)
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_the_process_really_dies_by_sigkill(tmp_path):
    marker = tmp_path / "marker"
    code = "from engine.testing.faults import fault_point; fault_point('actor', 'gradients', 0); print('alive')"
    environment = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        **{faults.VARIABLE: f"actor:gradients:0:{marker}"},
    )
    first = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL and first.stdout == ""
    assert int(marker.read_text()) != os.getpid()  # the child's pid, written before it died
    second = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    assert (second.returncode, second.stdout) == (0, "alive\n")
