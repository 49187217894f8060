"""One capability matrix (engine.config.capabilities): method × placement × store kind × feature, declared as
data and checked by one validator on every route.

The expected refusals are restated here from the reasons each combination cannot run, independently of the
table; the per-token column is checked against the method implementations themselves."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

import engine.config.capabilities
from engine.config import MethodConfig, method_names, parse_config
from engine.config.capabilities import (
    FEATURES,
    PLACEMENT_KINDS,
    STORE_KINDS,
    capability_matrix,
    check_capability,
)
from engine.errors import TributaryError
from engine.indexing.plan_and_build import plan_and_build
from engine.spectral.methods import method_from_config
from tests.call_counting import count_calls
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.requirements import require

SINGLE_TERM = {"grad_dot", "grad_cos", "if"}  # one query term at the final model, F = 1 or F(Λ)


def _expected_supported(method: str, placement: str, store: str, feature: str | None) -> bool:
    if placement == "zero3" and (feature not in (None, "exact") or store != "checkpoint"):
        return False  # no one process holds a zero3 model (its ranks stream exact scores in lockstep); no runs yet
    if method == "fast_source" and store != "averaged_run":
        return False  # scores at each segment's averaged parameters
    if method == "tracin" and store == "checkpoint":
        return False  # sums over a run's checkpoints with their learning rates
    if feature == "exact":  # engine.exact streams one full-width term at one checkpoint's (a run's final) weights
        return method in SINGLE_TERM or method == "tracin"  # tracin: a grad_dot pass at each checkpoint
    if feature == "per_token":
        return method in SINGLE_TERM or (method == "source" and store == "checkpoint")
    return True


def test_the_matrix_covers_every_declared_method_placement_store_and_feature():
    matrix = capability_matrix()
    assert set(matrix) == {
        (m, p, s, f) for m in method_names() for p in PLACEMENT_KINDS for s in STORE_KINDS for f in (None, *FEATURES)
    }
    assert PLACEMENT_KINDS == ("single", "device_map", "zero3")
    assert {key: value for key, value in matrix.items()} == {key: _expected_supported(*key) for key in matrix}


def test_the_per_token_column_agrees_with_the_method_implementations():
    """Per-token splits one query term: a method without its own terms, or a spectral F(Λ) on one checkpoint."""
    for name in method_names():
        method = method_from_config(
            MethodConfig(name=name, eta=0.1, steps=3) if name == "source" else MethodConfig(name=name)
        )
        for store in STORE_KINDS:
            implemented = method.build_terms is None or (method.spectral is not None and store == "checkpoint")
            allowed = capability_matrix()[(name, "single", store, "per_token")]
            assert allowed == (implemented and capability_matrix()[(name, "single", store, None)]), (name, store)


@pytest.mark.parametrize("key", [key for key, ok in capability_matrix().items() if not ok], ids=str)
def test_each_unsupported_combination_is_refused_in_one_line(key):
    method, placement, store, feature = key
    with pytest.raises(TributaryError) as refused:
        check_capability(method, placement, store, () if feature is None else (feature,))
    message = str(refused.value)
    assert "\n" not in message
    named = {
        "per_token": "--per-token",
        "generate": "--generate",
        "serve": "tributary serve",
        "exact": "--exact/--rescore",
    }.get(feature or "")
    assert any(part in message for part in (f"method {method}", f"placement.kind {placement}", named) if part)
    assert "; " in message  # and what to change


def test_each_supported_combination_passes():
    for (method, placement, store, feature), ok in capability_matrix().items():
        if ok:
            check_capability(method, placement, store, () if feature is None else (feature,))


# ---- every route goes through the one validator --------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("capabilities")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train)
    plan_and_build(parse_config(raw), show_progress=False)
    config_file = root / "job.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    queries = write_jsonl(root / "q.jsonl", [{"id": "q", "prompt": "the fox eats", "completion": " berries"}])
    return {"root": root, "raw": raw, "config_file": config_file, "queries": queries}


@pytest.fixture
def validator_calls(monkeypatch) -> Counter:
    counts: Counter = Counter()
    count_calls(monkeypatch, counts, "check_capability", engine.config.capabilities.check_capability)
    return counts


def test_parsing_and_deriving_go_through_the_matrix(indexed, validator_calls):
    config = parse_config(indexed["raw"])
    assert validator_calls["check_capability"] == 1
    with pytest.raises(TributaryError, match="method tracin needs a training-run store"):
        config.derive(method={"name": "tracin"})
    assert validator_calls["check_capability"] == 2
    with pytest.raises(TributaryError, match="method fast_source needs a training-run store indexed with"):
        parse_config(dict(indexed["raw"], method={"name": "fast_source"}))
    with pytest.raises(TributaryError, match="placement.kind zero3 is not supported with a training-run store"):
        parse_config(
            dict(
                indexed["raw"],
                placement={"kind": "zero3", "devices_per_replica": 2},
                cluster={"address": "local"},
                training_run={"checkpoints": [indexed["raw"]["model"]["path"]]},
            )
        )
    assert validator_calls["check_capability"] == 4


def test_the_query_flags_go_through_the_matrix(indexed, validator_calls):
    result = invoke("query", indexed["config_file"], "--queries", indexed["queries"], "--per-token", "--method", "trak")
    assert_clean_failure(result, "--per-token is available for grad_dot, grad_cos, if, source", "not for method trak")
    assert validator_calls["check_capability"] >= 2  # the config as parsed and derived, then the flags
    assert not (indexed["root"] / "trak").exists()


def test_an_http_request_goes_through_the_matrix(indexed, validator_calls):
    require("ray.serve")
    from engine.serving.app import build_api
    from engine.serving.plan import resolve_serve_plan
    from tests.service_helpers import asgi_request, replica

    service = replica(resolve_serve_plan(parse_config(indexed["raw"])))
    before = validator_calls["check_capability"]
    body = {"queries": [{"prompt": "the fox eats", "completion": " berries"}], "top_k": 2, "method": "tracin"}
    status, answer = asgi_request(build_api(service), "POST", "/v1/attribute", json.dumps(body).encode())
    assert status == 400 and "method tracin needs a training-run store" in answer["error"], answer
    assert validator_calls["check_capability"] > before
