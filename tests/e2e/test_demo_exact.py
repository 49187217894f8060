"""`tributary demo --toy --exact` prints the overlap of the store's top-10 with exact EK-FAC's top-10, and that
overlap is the one an independent exact ranking gives: a dim-0 store of the same model and rows (whose scores
equal --exact's, tests/exact/test_exact.py) against the demo's dim-16 store queried for its top-10."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from engine.cli import app
from engine.config import parse_config
from engine.local_or_ray import run_index, run_query


@pytest.mark.heavy  # ~30 s of CPU: the toy demo, its full-width factors and a dim-0 index
def test_toy_demo_exact_prints_the_overlap_with_a_dim0_store(tmp_path):
    root = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--toy", "--workdir", str(root), "--small", "--exact"])
    assert result.exit_code == 0, result.output
    printed = json.loads((root / "exact_overlap.json").read_text())
    assert "shared with exact EK-FAC's top-10" in result.output

    raw = yaml.safe_load((root / "config.yaml").read_text())
    queries = str(root / "queries.jsonl")
    store_top = run_query(parse_config(raw), queries, 10).top_indices
    raw.pop("exact")
    dim0 = parse_config({**raw, "projection": {"dim": 0}, "store": {"path": str(tmp_path / "dim0.zarr")}})
    run_index(dim0, show_progress=False)
    exact_top = run_query(dim0, queries, 10).top_indices
    expected = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(store_top, exact_top)]
    np.testing.assert_allclose(printed["top10_overlap"], expected)
    assert f"mean {np.mean(expected):.0%}" in result.output
