"""Methods, query options and result records are each declared once; everything else reads the declaration."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from engine.config import METHODS, GenerationSettings, MethodConfig, QueryOptions, method_names, parse_config
from engine.data.tokenize import TokenizedRow
from engine.errors import TributaryError
from engine.query.records import Query, result_records
from engine.query.scoring import QueryResult
from engine.spectral.methods import implemented_methods, implements, method_from_config

README = Path(__file__).resolve().parents[2] / "README.md"
DECLARED = [spec.name for spec in METHODS]


def readme_methods_table() -> list[str]:
    """The method names in the first column of the README's methods table (the one with a cost column)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | query side | needs |"))
    names = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        match = re.match(r"\| `(\w+)` \|", line)
        assert match, f"README methods table row without a `method` name: {line[:60]}"
        names.append(match.group(1))
    return names


def test_every_declared_method_is_implemented_once_and_documented():
    assert sorted(implemented_methods()) == sorted(DECLARED)
    assert len(set(DECLARED)) == len(DECLARED)
    assert sorted(readme_methods_table()) == sorted(DECLARED)
    for name in DECLARED:
        assert method_from_config(MethodConfig(name=name)).name == name


def test_an_implementation_needs_a_declared_name_and_only_one():
    with pytest.raises(ValueError, match="'lissa' is not declared"):
        implements("lissa")(lambda config: method_from_config(config))
    with pytest.raises(ValueError, match="'if' is implemented twice"):
        implements("if")(lambda config: method_from_config(config))
    assert method_from_config(MethodConfig(name="if")).spectral is not None  # the first one still answers


def test_an_unknown_method_is_refused_naming_every_declared_one():
    with pytest.raises(ValidationError) as caught:
        MethodConfig(name="lissa")
    assert caught.value.errors()[0]["msg"] == "unknown method 'lissa'; use one of " + ", ".join(DECLARED)
    raw = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "store": {"path": "s"}, "method": {"name": "x"}}
    with pytest.raises(TributaryError) as config_error:
        parse_config(raw, source="job.yaml")
    assert "method.name: unknown method 'x'; use one of grad_dot, grad_cos, if," in str(config_error.value)
    assert MethodConfig.model_json_schema()["properties"]["name"]["enum"] == list(method_names())


def test_the_query_commands_flags_take_the_declared_defaults():
    import typer.main
    from typer.core import TyperGroup, TyperOption

    from engine.cli import app

    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    command = group.commands["query"]
    params = {p.name: p for p in command.params}
    flags = {name: sorted(p.opts + p.secondary_opts) for name, p in params.items()}
    assert flags == {
        "config": ["config"],
        "queries": ["--queries"],
        "top_k": ["--top-k"],
        "out": ["--out"],
        "scores_out": ["--scores-out"],
        "report": ["--report"],
        "per_module": ["--per-module"],
        "per_token": ["--per-token"],
        "measurement": ["--measurement"],
        "method": ["--method"],
        "generate": ["--generate"],
        "max_new_tokens": ["--max-new-tokens"],
        "sample": ["--sample"],
        "temperature": ["--temperature"],
        "top_p": ["--top-p"],
        "seed": ["--seed"],
        "chat": ["--chat", "--no-chat"],
        "approximate": ["--approximate"],
        "rerank": ["--rerank"],
        "exact": ["--exact"],
        "rescore": ["--rescore"],
    }
    defaults = {name: params[name].default for name in params if name not in ("config", "queries")}
    assert defaults == {
        "top_k": 10,
        "out": None,
        "scores_out": None,
        "report": None,
        "per_module": False,
        "per_token": False,
        "measurement": "logprob_sum",
        "method": None,
        "generate": False,
        "max_new_tokens": 40,
        "sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 0,
        "chat": None,
        "approximate": False,
        "rerank": 100,
        "exact": False,
        "rescore": None,
    }
    options = {p.name: p for p in command.params if isinstance(p, TyperOption)}  # the ones with help
    assert options["top_k"].help == "supporting (and opposing) training examples per query"
    assert options["max_new_tokens"].help == "--generate: tokens to generate"
    method_help = options["method"].help
    assert method_help is not None and all(name in method_help for name in DECLARED)


def test_bad_option_values_are_named_by_their_flag():
    from tests.cli_helpers import invoke

    for flags, message in (
        (["--top-k", "0"], "--top-k must be positive, got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be positive, got -1"),
        (["--generate", "--top-p", "1.5"], "--top-p: Input should be less than or equal to 1 (got 1.5)"),
        (["--measurement", "entropy"], "--measurement 'entropy' is unknown"),
        (["--approximate", "--rerank", "-1"], "--rerank: Input should be greater than or equal to 0 (got -1)"),
    ):
        result = invoke("query", "no-config.yaml", "--queries", "q.jsonl", *flags)
        assert result.exit_code == 2 and message in result.output, result.output


def test_the_request_body_reads_the_declared_options():
    from engine.serving.schema import AttributeRequest

    query = [{"prompt": "p", "completion": " c"}]
    request = AttributeRequest.model_validate({"queries": query})
    assert request.options() == QueryOptions()
    request = AttributeRequest.model_validate({"queries": query, "top_k": 3, "generate": {"max_new_tokens": 4}})
    assert request.options() == QueryOptions(k=3, generation=GenerationSettings(max_new_tokens=4))
    assert AttributeRequest.model_validate({"queries": query, "generate": True}).generation() == GenerationSettings()
    for bad in ({"top_k": 0}, {"generate": {"top_p": 2}}, {"generate": {"colour": 1}}):
        with pytest.raises(ValidationError):
            AttributeRequest.model_validate(dict(bad, queries=query))
    properties = AttributeRequest.model_json_schema()["properties"]
    assert properties["top_k"]["default"] == 10 and properties["top_k"]["exclusiveMinimum"] == 0
    assert properties["measurement"]["default"] == "logprob_sum"


def test_options_validate_and_keep_positional_construction():
    assert GenerationSettings(6, True, 1.5, 0.9, 3, False).describe() == {
        "max_new_tokens": 6,
        "sample": True,
        "temperature": 1.5,
        "top_p": 0.9,
        "seed": 3,
        "chat": False,
    }
    bad_settings: tuple[dict[str, Any], ...] = ({"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 1.5})
    for bad in bad_settings:
        with pytest.raises(ValidationError):
            GenerationSettings(**bad)
    with pytest.raises(ValidationError):
        QueryOptions(k=0)


def test_records_serialise_in_field_order_without_absent_options():
    row = TokenizedRow(index=0, input_ids=[1, 2, 3], labels=[1, 2, 3])
    queries = [Query("t", row, text="hello"), Query("p", row, prompt="a", completion="b", generated=True)]
    result = QueryResult(
        np.array([[1], [0]]), np.array([[0.5], [0.25]]), np.array([[0], [1]]), np.array([[-1.0], [-2.0]]), None
    )
    plain = result_records(queries, result, ["r0", "r1"], None, "if", "margin", ["m"], [["x"], ["y"]])
    assert [json.dumps(record) for record in plain] == [
        '{"query": 0, "id": "t", "method": "if", "measurement": "margin", "generated": false, '
        '"completion_tokens": ["x"], "top_k": [{"rank": 1, "index": 1, "id": "r1", "score": 0.5}], '
        '"bottom_k": [{"rank": 1, "index": 0, "id": "r0", "score": -1.0}], "text": "hello"}',
        '{"query": 1, "id": "p", "method": "if", "measurement": "margin", "generated": true, '
        '"completion_tokens": ["y"], "top_k": [{"rank": 1, "index": 0, "id": "r0", "score": 0.25}], '
        '"bottom_k": [{"rank": 1, "index": 1, "id": "r1", "score": -2.0}], "prompt": "a", "completion": "b"}',
    ]
    result.per_module = {kind: [np.array([[0.125]]), np.array([[0.75]])] for kind in ("top", "bottom")}
    result.per_token = {kind: [np.array([[0.5]]), np.array([[0.25]])] for kind in ("top", "bottom")}
    (full, _) = result_records(queries, result, ["r0", "r1"], ["s0", "s1"], "if", "margin", ["m"], [["x"], ["y"]])
    assert list(full) == [
        "query",
        "id",
        "method",
        "measurement",
        "generated",
        "completion_tokens",
        "top_k",
        "bottom_k",
        "token_scores",
        "text",
    ]
    assert full["top_k"] == [
        {
            "rank": 1,
            "index": 1,
            "id": "r1",
            "score": 0.5,
            "snippet": "s1",
            "per_module": {"m": 0.125},
            "per_token": [0.5],
        }
    ]
    assert full["token_scores"] == [0.5]
