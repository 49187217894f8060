"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): every endpoint, requests that fit the schema
and requests that do not, sent to an in-process replica over a real store and tiny model.

Every answer must: not be a server error (5xx; 503 is documented for a changed store, which does not happen
here), have a status the schema documents, match the documented body schema and content type, refuse data
that violates the schema (4xx), and come back within serve.request_timeout_s. The default group sends a few
dozen requests; the heavy group over a thousand.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.requirements import require

schemathesis = require("schemathesis")
require("ray.serve")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

TIMEOUT_S = 20.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api(tiny_models, tmp_path_factory):
    from tests.service_helpers import indexed_config, replica_api

    root = tmp_path_factory.mktemp("fuzz")
    raw = indexed_config(root, tiny_models["gpt2"], request_timeout_s=TIMEOUT_S, max_new_tokens=4)
    return replica_api(raw)[1]


def _sender(operation, mode: GenerationMode, examples: int, seen: Counter):
    """A hypothesis test sending `examples` generated requests of `mode` to `operation`, counting statuses."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case):
        started = time.perf_counter()
        response = case.call()
        seconds = time.perf_counter() - started
        seen[(operation.label, mode.value, response.status_code)] += 1
        assert seconds <= TIMEOUT_S, f"{operation.label} took {seconds:.1f} s"
        case.validate_response(response, checks=CHECKS)

    return send


def _fuzz(api, examples: int) -> Counter:
    """Send `examples` generated requests per endpoint and mode; the statuses seen, by endpoint."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"GET /v1/health", "GET /v1/info", "POST /v1/attribute"}
    seen: Counter = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _sender(operation, mode, examples, seen)()
            except Unsatisfiable:  # an endpoint with no parameters or body has no request that violates it
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
    return seen


def _sent(seen: Counter, label: str, mode: str) -> int:
    return sum(count for (sent_to, sent_as, _), count in seen.items() if (sent_to, sent_as) == (label, mode))


def test_the_api_answers_generated_requests_as_its_schema_says(api):
    """The GET endpoints take no input: one request each exhausts what the schema allows."""
    seen = _fuzz(api, examples=10)
    assert _sent(seen, "POST /v1/attribute", "positive") == _sent(seen, "POST /v1/attribute", "negative") == 10
    assert _sent(seen, "GET /v1/health", "positive") == _sent(seen, "GET /v1/info", "positive") == 1


@pytest.mark.heavy
def test_the_api_answers_over_a_thousand_generated_requests_as_its_schema_says(api):
    seen = _fuzz(api, examples=520)
    assert sum(seen.values()) >= 1000, seen
