"""Derived configs: `JobConfig.derive` is the one way to make one, and it validates again as parsing does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.config import JobConfig, parse_config
from engine.errors import TributaryError
from engine.training_run.configs import checkpoint_config
from tests.conftest import job_config

ENGINE = Path(__file__).resolve().parents[2] / "engine"
# The validating copies: a job config's derive(), and a store manifest's updated() (validated like one read
# from disk). Any other `model_copy(update=` skips validation.
VALIDATING_COPIES = {("engine/config/job.py", "derive"), ("engine/store/manifest.py", "updated")}


def _copies_with_update(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of every `.model_copy(update=...)` call in one file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "model_copy"
                and any(keyword.arg == "update" for keyword in child.keywords)
            ):
                found.append((function, child.lineno))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_no_model_copy_with_update_outside_derive():
    offending = [
        f"{path.relative_to(ENGINE.parent)}:{line} (in {function})"
        for path in sorted(ENGINE.rglob("*.py"))
        for function, line in _copies_with_update(path)
        if (str(path.relative_to(ENGINE.parent)), function) not in VALIDATING_COPIES
    ]
    assert offending == [], "derive configs with JobConfig.derive, which validates again: " + ", ".join(offending)


def test_the_scan_sees_a_model_copy_with_update(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(c):\n    return c.model_copy(update={'a': 1})\n\n\nx = 1\n")
    assert _copies_with_update(sample) == [("f", 2)]


@pytest.fixture
def raw(tmp_path, tiny_models, text_train) -> dict:
    return job_config(tmp_path, tiny_models["gpt2"], text_train)


def test_derive_equals_parsing_the_changed_mapping(raw, tmp_path):
    config = parse_config(raw)
    derived = config.derive(store={"path": str(tmp_path / "other.zarr")}, cluster={"address": "local"})
    changed = dict(raw, store=dict(raw["store"], path=str(tmp_path / "other.zarr")), cluster={"address": "local"})
    assert derived == parse_config(changed)
    assert config.store.path == raw["store"]["path"]  # the original is untouched
    assert derived.derive(cluster=None, store={"path": raw["store"]["path"]}) == config
    assert config.derive(method=config.method.model_copy()) == config


def test_derive_applies_the_rules_that_span_sections(raw):
    config = parse_config(raw)
    with pytest.raises(TributaryError, match="placement.kind zero3 runs its ranks as Ray actors"):
        config.derive(placement={"kind": "zero3", "devices_per_replica": 2})
    with pytest.raises(TributaryError, match="method 'source' needs method.eta"):
        config.derive(method={"name": "source"})
    with pytest.raises(TributaryError, match=r"invalid config \(derived\):\n  store.dtype"):
        config.derive(store={"dtype": "int8"})
    with pytest.raises(ValueError, match="no section 'stores'"):
        config.derive(stores={"path": "x"})


def test_a_checkpoint_config_takes_its_schedule_from_the_run(raw, tmp_path):
    """Source without eta/steps is valid in a training run; one checkpoint's config keeps that validity."""
    run = parse_config(dict(raw, method={"name": "source"}, training_run={"checkpoints": ["a", "b"]}))
    sub = checkpoint_config(run, "weights/a", "rows.jsonl", str(tmp_path / "a.zarr"))
    assert sub.training_run is None and sub.method == run.method
    assert (sub.model.path, sub.model.tokenizer, sub.data.train, sub.store.path) == (
        "weights/a",
        run.model.path,
        "rows.jsonl",
        str(tmp_path / "a.zarr"),
    )
    assert isinstance(sub, JobConfig)
