"""`serve.rescore: K`: a replica re-scores each request's store candidates with the exact pass, and answers what
`tributary query --rescore K` writes for the same queries (each listed example marked exact or store).

The replica's own class runs in this process (no Ray, no HTTP): the request goes through the same validation,
pass queue and batch scoring as a served one, and its body through the response model the API publishes.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
import yaml

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from engine.serving.app import AttributionService, build_api
from engine.serving.plan import resolve_serve_plan
from engine.serving.schema import AttributeRequest, AttributeResponse
from engine.serving.validation import prepare
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, job_config, write_jsonl
from tests.requirements import require
from tests.service_helpers import listed_examples, listed_scores

require("ray.serve")

K, TOP_K = 2, 3
QUERIES = [
    {"id": f"q{i}", "prompt": prompt, "completion": " " + completion} for i, (prompt, completion) in enumerate(PROMPTS)
]


def _replica_class():
    """The deployment's own class (Serve wraps it in an ASGI replica wrapper that expects a running Serve)."""
    wrapped: type = AttributionService.func_or_class  # pyright: ignore[reportAssignmentType]
    return [k for k in wrapped.__mro__ if k.__name__ == "AttributionService"][-1]


@pytest.fixture
def rescoring(tiny_models, text_train, tmp_path):
    """A dim-4 float64 store with full-width factors, its CLI config, and a replica serving it with rescore K."""
    raw = job_config(tmp_path, tiny_models["gpt2"], text_train, projection={"dim": 4}, exact={"factors": True})
    run_index(parse_config(raw), show_progress=False)
    cli_config = tmp_path / "cli.yaml"
    cli_config.write_text(yaml.safe_dump(raw))
    threads = torch.get_num_threads()  # the replica sets its own thread count
    try:
        service = _replica_class()(parse_config(dict(raw, serve={"rescore": K})))
    finally:
        torch.set_num_threads(threads)
    return {"raw": raw, "cli_config": cli_config, "service": service, "root": tmp_path}


def _served(service, queries: list[dict]) -> list[dict]:
    """The body the API answers: the replica's records through the published response model."""
    body = asyncio.run(service.attribute(AttributeRequest.model_validate({"queries": queries, "top_k": TOP_K})))
    return AttributeResponse.model_validate(body).model_dump(exclude_none=True)["results"]


def _cli(rescoring, name: str, queries: list[dict]) -> list[dict]:
    path = write_jsonl(rescoring["root"] / f"{name}.jsonl", queries)
    out = rescoring["root"] / f"{name}.results.jsonl"
    result = invoke("query", rescoring["cli_config"], "--queries", path, "--rescore", K, "--top-k", TOP_K, "--out", out)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_rescored_request_equals_tributary_query_rescore(rescoring):
    served = _served(rescoring["service"], QUERIES)
    cli = _cli(rescoring, "all", QUERIES)
    assert listed_examples(served) == listed_examples(cli)
    np.testing.assert_allclose(listed_scores(served), listed_scores(cli), rtol=1e-9, atol=1e-12)
    assert [r["method"] for r in served] == [r["method"] for r in cli]
    assert {e["source"] for r in served for e in r["top_k"] + r["bottom_k"]} == {"exact"}


def test_a_request_is_ranked_among_its_own_candidates_whoever_shares_its_batch(rescoring):
    """Two requests in one pass (one exact pass over both candidate sets) each answer as when sent alone: the
    other request's candidates, scored exactly too, do not enter this one's ranking."""
    service = rescoring["service"]
    first, second = QUERIES[:2], QUERIES[2:]
    items = [
        prepare(
            AttributeRequest.model_validate({"queries": queries, "top_k": TOP_K}),
            service.attributor,
            service.limits,
            service.request_tokenizer,
        )
        for queries in (first, second)
    ]
    together = service._score_batch(items)
    for records, queries, name in zip(together, (first, second), ("first", "second")):
        cli = _cli(rescoring, name, queries)
        records = json.loads(json.dumps(records))
        assert listed_examples(records) == listed_examples(cli)
        np.testing.assert_allclose(listed_scores(records), listed_scores(cli), rtol=1e-9, atol=1e-12)


def test_a_request_with_a_method_that_has_no_exact_form_is_refused_alone(rescoring):
    service = rescoring["service"]
    items = [
        prepare(
            AttributeRequest.model_validate({"queries": QUERIES[:1], "top_k": TOP_K, "method": method}),
            service.attributor,
            service.limits,
            service.request_tokenizer,
        )
        for method in ("trak", "if")
    ]
    refused, answered = service._score_batch(items)
    assert refused.status == 422 and "has no exact streamed form" in refused.message
    assert listed_examples(json.loads(json.dumps(answered))) == listed_examples(_cli(rescoring, "one", QUERIES[:1]))


def test_the_published_schema_names_the_source_and_stays_optional(rescoring):
    schema = build_api(rescoring["service"]).openapi()["components"]["schemas"]["TrainingExample"]
    assert "source" in schema["properties"] and "source" not in schema.get("required", [])
    assert {"exact", "store"} <= set(json.dumps(schema["properties"]["source"]).replace('"', " ").split())


@pytest.mark.parametrize("value", [0, -3])
def test_a_bad_rescore_is_refused_at_config_time_in_one_line(tmp_path, tiny_models, text_train, value):
    raw = job_config(tmp_path, tiny_models["gpt2"], text_train, serve={"rescore": value})
    with pytest.raises(TributaryError) as refused:
        parse_config(raw, source="serve.yaml")
    message = str(refused.value)
    assert "\n" not in message
    assert f"serve.rescore must be positive, got {value}" in message
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_clean_failure(invoke("serve", path), "serve.rescore must be positive")


def test_serving_rescore_without_full_width_factors_is_refused_before_starting(tmp_path, tiny_models, text_train):
    raw = job_config(tmp_path, tiny_models["gpt2"], text_train, projection={"dim": 4})
    run_index(parse_config(raw), show_progress=False)
    with pytest.raises(TributaryError, match=r"no full-width factors.*exact: \{factors: true\}"):
        resolve_serve_plan(parse_config(dict(raw, serve={"rescore": K})))
    with pytest.raises(TributaryError, match="has no exact streamed form"):
        resolve_serve_plan(parse_config(dict(raw, serve={"rescore": K}, method={"name": "trak"})))
