"""A query run is resolved once into a QueryPlan: the method, the final model and the queries file are each
worked out once per run (counted here on a tiny model), and the plan's checks refuse bad requests before any
model loads."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import engine.data.lines
import engine.query.attributor
import engine.query.generate
import engine.spectral.methods
from engine.config import GenerationSettings, QueryOptions, parse_config
from engine.errors import TributaryError
from engine.indexing.plan_and_build import plan_and_build
from engine.query.plan import QueryOutputs, resolve_query_plan
from engine.query.plan_and_score import plan_and_score
from tests.call_counting import count_calls
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl

QUERIES = [
    {"id": "q-owl", "text": "the owl eats fish in the cold sea"},
    {"id": "q-prompt", "prompt": "the fox eats", "completion": " honey in the valley"},
]


@pytest.fixture(scope="module")
def indexed(tiny_models, tmp_path_factory) -> dict:
    """An `if` (EK-FAC) store of the tiny GPT-2, projection dim 0, built in this process."""
    root = tmp_path_factory.mktemp("query_plan")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train)
    config = parse_config(raw)
    plan_and_build(config, show_progress=False)
    return {
        "root": root,
        "raw": raw,
        "config": config,
        "queries": write_jsonl(root / "queries.jsonl", QUERIES),
        "prompts": write_jsonl(
            root / "prompts.jsonl", [{"id": f"g{i}", "prompt": p} for i, (p, _) in enumerate(PROMPTS)]
        ),
    }


@pytest.mark.parametrize("generated", [False, True], ids=["rows", "generate"])
def test_run_query_resolves_method_final_model_and_queries_once(indexed, monkeypatch, tmp_path, generated):
    queries = indexed["prompts"] if generated else indexed["queries"]
    options = QueryOptions(k=3, generation=GenerationSettings(max_new_tokens=3) if generated else None)
    expected = plan_and_score(
        indexed["config"], str(queries), 3, scores_out=str(tmp_path / "expected.npy"), options=options
    )
    counts: Counter = Counter()
    reader = engine.data.lines.json_records
    count_calls(monkeypatch, counts, "method", engine.spectral.methods.method_from_config)
    count_calls(monkeypatch, counts, "final model", engine.query.attributor.final_model)
    count_calls(monkeypatch, counts, "queries file", engine.data.lines.json_records, only_path=queries)
    assert engine.query.generate.json_records is not reader  # the wrapper is where the queries are read
    result = plan_and_score(
        indexed["config"], str(queries), 3, scores_out=str(tmp_path / "scores.npy"), options=options
    )
    assert counts == {"method": 1, "final model": 1, "queries file": 1}
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), np.load(tmp_path / "expected.npy"))
    np.testing.assert_array_equal(result.top_indices, expected.top_indices)


def test_the_plan_holds_what_the_run_consumes(indexed, tmp_path):
    plan = resolve_query_plan(
        indexed["config"],
        str(indexed["queries"]),
        QueryOptions(k=2),
        QueryOutputs(out=str(tmp_path / "r.jsonl"), report=str(tmp_path / "r.html")),
    )
    assert plan.method.name == "if" and plan.store.path == plan.opened.path == indexed["raw"]["store"]["path"]
    assert [row.id for row in plan.rows or []] == [q["id"] for q in QUERIES] and plan.prompts is None
    assert plan.final_config == indexed["config"] and not plan.need_full
    assert plan.outputs.paths() == [str(tmp_path / "r.jsonl"), str(tmp_path / "r.html")]


@pytest.mark.parametrize(
    ("options", "outputs", "message"),
    [
        (QueryOptions(k=2, per_token=True, measurement="logprob_sum"), QueryOutputs(), None),
        (QueryOptions(k=2), QueryOutputs(out="SAME", scores_out="SAME"), "--out and --scores-out are both"),
        (QueryOptions(k=2, approximate=True), QueryOutputs(), "has no ANN index"),
    ],
    ids=["per-token-ok", "same-outputs", "missing-ann-index"],
)
def test_the_plan_refuses_before_any_model_loads(indexed, tmp_path, options, outputs, message):
    if outputs.out == "SAME":
        outputs = QueryOutputs(out=str(tmp_path / "same"), scores_out=str(tmp_path / "same"))
    if message is None:
        resolve_query_plan(indexed["config"], str(indexed["queries"]), options, outputs)
        return
    with pytest.raises(TributaryError, match=message):
        resolve_query_plan(indexed["config"], str(indexed["queries"]), options, outputs)
    assert not list(tmp_path.iterdir())  # nothing written
