"""Core dependencies in tests: a missing one skips a plain local run but FAILS under CI (CI=true), where its
absence is a broken install, not a reason to check nothing (pytest.importorskip would pass CI silently).

Module level: `ray = require("ray")`. A test: `@pytest.mark.requires_ray` (tests/conftest.py applies it)."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest

# marker -> the module it needs (each a core dependency in pyproject.toml's [project] dependencies)
MARKERS = {"requires_ray": "ray", "requires_ray_serve": "ray.serve", "requires_deepspeed": "deepspeed"}


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(module: str) -> Any:  # Any, as pytest.importorskip: the tests use the module's attributes
    """The module, imported; if it is missing: under CI a failure, otherwise a skip naming it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        reason = f"{module} is not importable ({error}); it is a core dependency: pip install -e '.[dev]'"
        if under_ci():
            pytest.fail(f"{reason}, and under CI the tests that need it must run", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def require_markers(item: pytest.Item) -> None:
    """tests/conftest.py's pytest_runtest_setup: each requires_* marker of the test, required."""
    for marker in item.iter_markers():
        module = MARKERS.get(marker.name)
        if module is not None:
            require(module)
