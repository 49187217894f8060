"""Input a hostile user sends: a value echoed in a refusal is cut (a 900 kB method, measurement or unknown key
never comes back whole, from the CLI or the HTTP API), true/false is not a number (`"top_k": true` is not 1),
a YAML syntax error is one line with file:line:column, the 413 of the body limit has the shape of every
other refusal, and `/v1/info` answers 503 once the store changed under the service, like `/v1/attribute`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from engine.config import QueryOptions, load_config, parse_config
from engine.errors import SHOWN_CHARS, TributaryError, shown
from tests.cli_helpers import assert_clean_failure, invoke

HUGE = 900_000
# a refusal quoting a cut value: the value's first SHOWN_CHARS characters and a sentence around them
SMALL_ANSWER = 4 * SHOWN_CHARS + 1000


def _config(tmp_path: Path) -> dict:
    return {
        "model": {"path": str(tmp_path / "model")},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "store": {"path": str(tmp_path / "store.zarr")},
    }


# ---- the shared cut -----------------------------------------------------------------------------------------
def test_shown_cuts_a_long_value_and_says_its_length():
    assert shown("grad_dot") == "'grad_dot'"
    cut = shown("x" * HUGE)
    assert cut == "'" + "x" * (SHOWN_CHARS - 1) + f"… ({HUGE} characters)"


# ---- config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "key"),
    [("data", "batch_size"), ("projection", "dim"), ("serve", "max_top_k"), ("store", "rows_per_chunk")],
)
def test_true_is_not_a_number_in_the_config(tmp_path, section, key):
    raw = _config(tmp_path)
    raw[section] = {key: True}
    with pytest.raises(TributaryError, match=rf"{section}\.{key}: must be a number, not true or false"):
        parse_config(raw)


def test_a_number_yaml_reads_as_text_still_reads(tmp_path):
    """PyYAML reads `1e-3` (no dot) as the string "1e-3": a config's number may arrive as text."""
    path = tmp_path / "job.yaml"
    raw = _config(tmp_path)
    path.write_text(yaml.safe_dump(raw) + "method: {name: source, eta: 1e-3, steps: 10}\n")
    assert yaml.safe_load(path.read_text())["method"]["eta"] == "1e-3"
    assert load_config(path).method.eta == pytest.approx(1e-3)


def test_a_bool_where_the_config_takes_one_still_reads(tmp_path):
    raw = _config(tmp_path)
    raw["curvature"] = {"strategy": "ekfac"}
    raw["serve"] = {"approximate": True}
    assert parse_config(raw).serve.approximate is True


def test_true_is_not_a_number_in_query_options():
    with pytest.raises(ValueError, match="must be a number"):
        QueryOptions(k=True)  # type: ignore[arg-type]


def test_a_huge_unknown_key_and_method_are_cut_in_the_config_error(tmp_path):
    raw = _config(tmp_path)
    raw["k" * HUGE] = 1
    raw["method"] = {"name": "m" * HUGE}
    with pytest.raises(TributaryError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert len(message) < 2 * SMALL_ANSWER
    assert f"… ({HUGE} characters): unknown key" in message and f"… ({HUGE} characters); use one of" in message


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  path: m\n data: [\n")
    with pytest.raises(TributaryError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"config file {path} is not valid YAML: {path}:3:2: expected <block end>")
    result = invoke("query", path, "--queries", tmp_path / "q.jsonl")
    assert_clean_failure(result, f"{path}:3:2:")
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


def test_a_huge_measurement_on_the_command_line_is_cut(tmp_path, tiny_models):
    from tests.conftest import write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": "a", "text": "the fox"}])
    config = tmp_path / "job.yaml"
    raw = _config(tmp_path) | {"model": {"path": str(tiny_models["gpt2"])}, "data": {"train": str(train)}}
    config.write_text(yaml.safe_dump(raw))
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "completion": " b"}])
    result = invoke("query", config, "--queries", queries, "--measurement", "z" * HUGE)
    assert_clean_failure(result, f"({HUGE} characters)")
    assert len(result.output) < SMALL_ANSWER


# ---- the HTTP API -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    """An in-process replica over a real store, taking bodies of up to 4 MB (so 900 kB values reach it)."""
    from tests.service_helpers import indexed_config, replica_api

    root = tmp_path_factory.mktemp("strict")
    raw = indexed_config(root, tiny_models["gpt2"], max_request_bytes=4 << 20, max_queries_per_request=4)
    return raw, *replica_api(raw)


def _post(api, body: dict | bytes) -> tuple[int, dict, int]:
    from tests.service_helpers import asgi_request

    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = asgi_request(api, "POST", "/v1/attribute", payload)
    return status, answer, len(json.dumps(answer))


QUERY = {"prompt": "the fox eats", "completion": " berries"}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"queries": [QUERY], "method": "m" * HUGE}, 400, "method"),
        ({"queries": [QUERY], "measurement": "z" * HUGE}, 400, "measurement"),
        ({"queries": [QUERY], "k" * HUGE: 1}, 422, "k" * SHOWN_CHARS + f"… ({HUGE} characters)"),
    ],
    ids=["method", "measurement", "unknown key"],
)
def test_a_huge_value_is_not_echoed_whole(service, body, status, field):
    _, _, api = service
    code, answer, size = _post(api, body)
    assert (code, answer.get("field")) == (status, field), str(answer)[:500]
    assert size < SMALL_ANSWER and f"({HUGE} characters)" in answer["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"queries": [QUERY], "top_k": True}, "top_k"),
        (
            {"queries": [{"prompt": "a"}], "generate": {"max_new_tokens": True}},
            "generate.GenerationSettings.max_new_tokens",
        ),
    ],
)
def test_true_is_not_a_number_in_a_request(service, body, field):
    _, _, api = service
    code, answer, _ = _post(api, body)
    assert code == 422 and "must be a number, not true or false" in answer["error"], answer
    assert answer["field"] == field


@pytest.mark.parametrize(
    ("body", "field", "why"),
    [
        (
            {"queries": [{"prompt": "a"}], "generate": {"chat": 1.0}},
            "generate.GenerationSettings.chat",
            "true or false",
        ),
        ({"queries": [QUERY], "top_k": "3"}, "top_k", "an integer, not a string"),
        ({"queries": [QUERY], "top_k": 3.0}, "top_k", "an integer, not a number"),
    ],
    ids=["chat 1.0 (found by tests/serving/test_api_fuzz.py)", "top_k '3'", "top_k 3.0"],
)
def test_a_value_of_another_json_type_is_not_converted(service, body, field, why):
    _, _, api = service
    code, answer, _ = _post(api, body)
    assert code == 422 and f"must be {why}" in answer["error"] and answer["field"] == field, answer


def test_the_body_limit_refuses_in_the_shape_of_every_other_refusal(service):
    raw, _, api = service
    limit = raw["serve"]["max_request_bytes"]
    too_many = _post(api, {"queries": [QUERY] * 5})
    too_large = _post(api, b" " * (limit + 1))
    assert too_many[0] == too_large[0] == 413
    assert set(too_many[1]) == set(too_large[1]) == {"error", "field", "limit"}
    assert too_large[1]["limit"] == limit and too_large[1]["field"] == "body"


def test_info_answers_503_once_the_store_was_replaced(service, tmp_path):
    from tests.service_helpers import asgi_request

    raw, replica, api = service
    store = Path(raw["store"]["path"])
    kept = tmp_path / "kept.zarr"
    shutil.move(store, kept)
    try:
        status, answer = asgi_request(api, "GET", "/v1/info")
        assert status == 503 and "removed or is being rewritten" in answer["error"], answer
        status, answer = _post(api, {"queries": [QUERY]})[:2]
        assert status == 503, answer
    finally:
        shutil.move(kept, store)
    assert replica.attributor.check_store_unchanged() is None
