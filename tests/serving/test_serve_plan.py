"""`tributary serve` is resolved once into a ServePlan in the process that starts it: the method and the final
model are worked out once per service (counted here on the tiny GPT-2, the replica built in this process), the
replica consumes the plan, and it answers as `tributary query` does on the same store."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import engine.query.attributor
import engine.spectral.methods
from engine.config import QueryOptions, parse_config
from engine.errors import TributaryError
from engine.indexing.plan_and_build import plan_and_build
from engine.query.plan_and_score import plan_and_score
from tests.call_counting import count_calls
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.requirements import require
from tests.service_helpers import asgi_request, replica


@pytest.fixture(scope="module")
def indexed(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve_plan")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train)
    plan_and_build(parse_config(raw), show_progress=False)
    return {"root": root, "raw": raw}


def test_a_service_resolves_method_and_final_model_once(indexed):
    require("ray.serve")
    from engine.serving.app import build_api
    from engine.serving.plan import resolve_serve_plan
    from engine.serving.service import build_application

    config = parse_config(indexed["raw"])
    counts: Counter = Counter()
    with pytest.MonkeyPatch.context() as monkeypatch:
        count_calls(monkeypatch, counts, "method", engine.spectral.methods.method_from_config)
        count_calls(monkeypatch, counts, "final model", engine.query.attributor.final_model)
        plan = resolve_serve_plan(config)
        build_application(plan)  # what `tributary serve` deploys: built from the plan alone
        service = replica(plan)
    assert counts == {"method": 1, "final model": 1}
    assert plan.final_store == indexed["raw"]["store"]["path"] and plan.method.name == "if"

    queries = [{"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]
    status, answer = asgi_request(
        build_api(service), "POST", "/v1/attribute", json.dumps({"queries": queries, "top_k": 3}).encode()
    )
    assert status == 200, answer
    expected = plan_and_score(
        config, str(write_jsonl(indexed["root"] / "q.jsonl", queries)), 3, options=QueryOptions(k=3)
    )
    for i, result in enumerate(answer["results"]):
        assert [entry["id"] for entry in result["top_k"]] == [f"t{j}" for j in expected.top_indices[i]]
        np.testing.assert_allclose([entry["score"] for entry in result["top_k"]], expected.top_scores[i], rtol=1e-9)


def test_the_plan_refuses_before_any_replica_starts(indexed, tmp_path):
    from engine.serving.plan import resolve_serve_plan

    zero3 = parse_config(
        dict(indexed["raw"], placement={"kind": "zero3", "devices_per_replica": 2}, cluster={"address": "local"})
    )
    with pytest.raises(TributaryError, match="tributary serve with placement.kind zero3 is not supported"):
        resolve_serve_plan(zero3)
    missing = parse_config(dict(indexed["raw"], store={"path": str(tmp_path / "none.zarr"), "dtype": "float64"}))
    with pytest.raises(TributaryError, match="none.zarr"):
        resolve_serve_plan(missing)
    assert not list(tmp_path.iterdir())
