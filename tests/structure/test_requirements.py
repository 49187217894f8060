"""A missing core dependency skips locally and fails under CI (tests/requirements.py)."""

from __future__ import annotations

import json

import pytest

from tests.requirements import MARKERS, require

MISSING = "tributary_no_such_module_27"


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_module_fails_under_ci_and_skips_otherwise(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=MISSING):
        require(MISSING)


def test_a_present_module_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("json") is json


def test_every_marker_is_registered_and_names_a_core_dependency(pytestconfig):
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    core = {dependency.split("[")[0].split(">")[0].split("=")[0].strip() for dependency in project["dependencies"]}
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    for marker, module in MARKERS.items():
        assert marker in registered
        assert module.split(".")[0] in core
