"""Every option is declared once (issue 27): each CLI flag is exactly one field of its command's model and each
field one flag, with the model's default and help; README's option tables are the models'; the options a query
shares with the service's request body are validated by the same model with the same refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.core
import typer.main
from pydantic import ValidationError

from engine.cli import app
from engine.config import COMMAND_ARGS, MEASUREMENTS, GenerationSettings, QueryOptions, ServeConfig
from engine.config.commands import QueryArgs, ServeArgs, flags_of, is_argument, readme_with_tables
from engine.config.query_options import option_field
from engine.serving.schema import AttributeRequest, QueryIn
from tests.cli_helpers import invoke

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands(command, path: str = "") -> dict:
    """Every command the CLI has, by how it is typed after `tributary` ("" for the top-level options)."""
    found = {path: command}
    if isinstance(command, typer.core.TyperGroup):
        for name, sub in command.commands.items():
            found.update(_commands(sub, f"{path} {name}".strip()))
    return found


def _runnable(commands: dict) -> dict:
    """The commands that run something, and the root (its options); groups like `ann` only hold commands."""
    return {path: c for path, c in commands.items() if not path or not isinstance(c, typer.core.TyperGroup)}


def _spelled(parameter) -> list[str]:
    """How a click parameter is typed, in the models' spelling (`--x/--no-x` for a pair)."""
    if _is_option(parameter) and parameter.secondary_opts:
        return [f"{'/'.join(parameter.opts)}/{'/'.join(parameter.secondary_opts)}"]
    return list(parameter.opts)


def _is_option(parameter) -> bool:
    return parameter.param_type_name == "option"  # typer's own copy of click: its classes, not click's


CLI = typer.main.get_command(app)
COMMANDS = _runnable(_commands(CLI))


def test_every_command_has_one_model_and_every_model_one_command():
    assert set(COMMANDS) == set(COMMAND_ARGS)


@pytest.mark.parametrize("path", sorted(COMMAND_ARGS))
def test_every_option_is_one_field_and_every_field_one_option(path):
    model, command = COMMAND_ARGS[path], COMMANDS[path]
    parameters = [p for p in command.params if p.name != "help"]
    names = [p.name for p in parameters]
    assert len(names) == len(set(names)), f"{path}: an option name twice: {names}"
    assert set(names) == set(model.model_fields), (
        f"tributary {path}: options {names} vs fields {list(model.model_fields)}"
    )
    for parameter in parameters:
        field = model.model_fields[str(parameter.name)]
        if _is_option(parameter):
            assert parameter.help == field.description, (path, parameter.name)
        if is_argument(field):
            assert parameter.param_type_name == "argument" and parameter.required, (path, parameter.name)
            continue
        assert _is_option(parameter), (path, parameter.name)
        assert _spelled(parameter) == flags_of(str(parameter.name), field), (path, parameter.name)
        assert parameter.required == field.is_required(), (path, parameter.name)
        if not field.is_required():
            assert parameter.default == field.default, (path, parameter.name, parameter.default, field.default)


def test_no_flag_is_typed_two_ways_in_one_command():
    for path, command in COMMANDS.items():
        typed = [opt for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", []))]
        assert len(typed) == len(set(typed)), (path, typed)


def test_readme_option_tables_are_the_models():
    readme = README.read_text()
    assert readme_with_tables(readme) == readme, (
        "README's command option tables differ from engine/config/commands.py: run "
        "`python -m engine.config.commands README.md`"
    )


def test_a_model_change_shows_in_the_tables():
    readme = README.read_text()
    field = QueryArgs.model_fields["top_k"]
    original = field.default
    try:
        field.default = original + 1
        assert readme_with_tables(readme) != readme
        assert f"| `--top-k` | `{original + 1}` |" in readme_with_tables(readme)
    finally:
        field.default = original


def test_the_query_options_and_the_request_body_are_declared_once():
    for cli_name, options, name in [
        ("top_k", QueryOptions, "k"),
        ("measurement", QueryOptions, "measurement"),
        ("max_new_tokens", GenerationSettings, "max_new_tokens"),
        ("rerank", QueryOptions, "rerank"),
    ]:
        declared = option_field(options, name)
        assert QueryArgs.model_fields[cli_name].default == declared.default
        assert QueryArgs.model_fields[cli_name].metadata == declared.metadata
    for request_name, name in [("top_k", "k"), ("measurement", "measurement")]:
        assert AttributeRequest.model_fields[request_name].default == option_field(QueryOptions, name).default
        assert AttributeRequest.model_fields[request_name].metadata == option_field(QueryOptions, name).metadata


def _refusal(build):
    with pytest.raises(ValidationError) as caught:
        build()
    return caught.value.errors()[0]


def test_an_unknown_measurement_is_one_refusal_on_every_route():
    expected = f"unknown measurement 'entropy'; use one of {', '.join(MEASUREMENTS)}"
    from_cli = _refusal(lambda: QueryArgs(config="c.yaml", queries="q.jsonl", measurement="entropy"))
    from_request = _refusal(
        lambda: AttributeRequest(queries=[QueryIn(prompt="p", completion="c")], measurement="entropy").options()
    )
    from_library = _refusal(lambda: QueryOptions(measurement="entropy"))
    assert from_cli["msg"] == from_request["msg"] == from_library["msg"] == expected
    result = invoke("query", "missing.yaml", "--queries", "q.jsonl", "--measurement", "entropy")
    assert result.exit_code == 2
    assert f"--measurement 'entropy' is unknown; use one of {', '.join(MEASUREMENTS)}" in result.output


def test_serve_help_names_the_serve_config_defaults():
    for name in ("host", "port", "replicas"):
        described = ServeArgs.model_fields[name].description or ""
        assert described.endswith(f"(default serve.{name}, {ServeConfig.model_fields[name].default})")


def test_serve_overrides_are_the_given_options():
    args = ServeArgs(config="c.yaml", port=9000)
    assert args.overrides() == {"port": 9000}


def test_a_bad_option_value_names_its_flag():
    result = invoke("query", "missing.yaml", "--queries", "q.jsonl", "--top-p", "1.5")
    assert result.exit_code == 2 and "--top-p:" in result.output and "1.5" in result.output
    result = invoke("query", "missing.yaml", "--queries", "q.jsonl", "--rerank", "-1")
    assert result.exit_code == 2 and "--rerank:" in result.output


def test_the_services_limits_are_named_as_the_serve_section_names_them():
    import dataclasses

    from engine.serving.validation import Limits

    names = [field.name for field in dataclasses.fields(Limits)]
    assert set(names) <= set(ServeConfig.model_fields), names
