"""Query plans resolved from a fixture store (tests/fixtures/store_v1: a 4-row EK-FAC store of a tiny GPT-2 at
projection dim 4, with its model, data and config), with loading a model made to fail: a plan is worked out
from the config, the store and the request alone. What it resolves is checked against the fixture's own files
(the queries JSONL read here, the model's config.json for the row width)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import engine.model.loading
from engine.config import GenerationSettings, JobConfig, QueryOptions, parse_config
from engine.errors import TributaryError
from engine.query.plan import QueryOutputs, describe_query_plan, resolve_query_plan
from engine.store.sizes import format_bytes
from tests.conftest import write_jsonl

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_v1"


@pytest.fixture
def fixture_store(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture (nothing may write into the repository); any model load fails the test."""

    def no_model(*args, **kwargs):
        raise AssertionError("a query plan loaded a model")

    monkeypatch.setattr(engine.model.loading, "load_model", no_model)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    root = tmp_path / "store_v1"
    shutil.copytree(FIXTURE, root)
    return root


def fixture_config(root: Path, **method) -> JobConfig:
    raw = yaml.safe_load((root / "job.yaml").read_text())
    raw["model"]["path"] = str(root / "model")
    raw["data"]["train"] = str(root / "train.jsonl")
    raw["store"]["path"] = str(root / "store.zarr")
    raw["method"] = method or raw["method"]
    return parse_config(raw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_stores_own_method_resolves_from_the_fixture(fixture_store):
    config = fixture_config(fixture_store)
    queries = fixture_store / "queries.jsonl"
    outputs = QueryOutputs(out=str(fixture_store / "r.jsonl"), scores_out=str(fixture_store / "s.npy"))
    plan = resolve_query_plan(config, str(queries), QueryOptions(k=3), outputs)

    assert plan.method.name == "if" and plan.method.needs_curvature
    assert plan.opened is plan.store and plan.final_config == config  # one checkpoint: its own model and store
    assert plan.store.path == str(fixture_store / "store.zarr")
    written = read_jsonl(queries)
    assert [(row.id, row.text) for row in plan.rows or []] == [(q["id"], q["text"]) for q in written]
    assert plan.prompts is None and plan.query_count == len(written)
    assert plan.need_full and not plan.uses_ann_index  # --scores-out keeps the whole matrix

    model = json.loads((fixture_store / "model" / "config.json").read_text())
    width = model["n_layer"] * 4 * config.projection.dim**2  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    rows = len(read_jsonl(fixture_store / "train.jsonl"))
    described = dict(describe_query_plan(plan))
    assert described["method"] == "if" and described["top k"] == "3"
    assert described["training rows"] == str(rows) and described["row width"] == f"{width} (float64)"
    assert described["store bytes"].startswith(format_bytes(rows * width * 8) + " of rows")
    assert described["queries"] == f"{len(written)} from {queries}"
    assert described["reads"] == f"{fixture_store / 'store.zarr'}, {queries}"
    assert described["writes"] == f"{outputs.out}, {outputs.scores_out}"
    assert described["placement"] == "single x1, float64, in this process"


@pytest.mark.parametrize(
    ("method", "curvature", "terms"),
    [
        ({"name": "grad_dot"}, False, False),
        ({"name": "grad_cos"}, False, False),
        ({"name": "if", "damping": 0.01}, True, False),
        ({"name": "trak"}, False, True),
        ({"name": "datainf", "damping": 0.5}, False, True),
        ({"name": "source", "eta": 0.1, "steps": 3}, True, True),
    ],
    ids=lambda value: value["name"] if isinstance(value, dict) else None,
)
def test_each_method_the_store_serves_resolves_to_its_implementation(fixture_store, method, curvature, terms):
    plan = resolve_query_plan(
        fixture_config(fixture_store, **method), str(fixture_store / "queries.jsonl"), QueryOptions(k=2)
    )
    assert plan.method.name == method["name"] and plan.method.needs_curvature == curvature
    assert (plan.method.build_terms is not None) == terms  # methods with terms of their own never use an ANN index
    assert not plan.need_full and plan.outputs.paths() == []


def test_prompts_to_complete_are_read_as_prompts(fixture_store):
    prompts = write_jsonl(
        fixture_store / "prompts.jsonl", [{"id": "g0", "prompt": "the fox eats"}, {"id": "g1", "prompt": "a bear"}]
    )
    options = QueryOptions(k=2, generation=GenerationSettings(max_new_tokens=2))
    plan = resolve_query_plan(fixture_config(fixture_store), str(prompts), options)
    assert plan.rows is None and [(p.id, p.prompt) for p in plan.prompts or []] == [
        ("g0", "the fox eats"),
        ("g1", "a bear"),
    ]
    assert dict(describe_query_plan(plan))["queries"] == f"2 from {prompts} (prompts to complete)"


@pytest.mark.parametrize(
    ("method", "options", "request_change", "message"),
    [
        ({}, QueryOptions(k=2), "out-is-a-directory", r"--out .* is a directory; give a file path"),
        ({}, QueryOptions(k=2), "no-queries-file", "queries file"),
        ({"name": "trak"}, QueryOptions(k=2, per_token=True), None, "--per-token is available for grad_dot, "),
        ({}, QueryOptions(k=2), "incomplete-store", "is incomplete"),
    ],
    ids=["out-dir", "missing-queries", "per-token-trak", "incomplete"],
)
def test_a_request_the_plan_cannot_serve_is_refused_before_anything_is_written(
    fixture_store, method, options, request_change, message
):
    config = fixture_config(fixture_store, **method)
    queries = fixture_store / "queries.jsonl"
    outputs = QueryOutputs()
    if request_change == "out-is-a-directory":
        outputs = QueryOutputs(out=str(fixture_store / "model"))
    elif request_change == "no-queries-file":
        queries = fixture_store / "absent.jsonl"
    elif request_change == "incomplete-store":
        zarr_json = fixture_store / "store.zarr" / "zarr.json"
        raw = json.loads(zarr_json.read_text())
        raw["attributes"]["manifest"]["complete"] = False
        zarr_json.write_text(json.dumps(raw))
    before = sorted(path.relative_to(fixture_store) for path in fixture_store.rglob("*"))
    with pytest.raises(TributaryError, match=message):
        resolve_query_plan(config, str(queries), options, outputs)
    assert sorted(path.relative_to(fixture_store) for path in fixture_store.rglob("*")) == before
