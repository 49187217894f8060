"""Each `tributary` command's arguments, declared once as a pydantic model: the CLI is made from these
(engine.cli), README's "Command options" tables are generated from them (benchmarks/command_options.py), and
the options a query shares with the service's request body are QueryOptions' and GenerationSettings' fields,
copied with their defaults, bounds and help (engine.serving.schema reads the same ones).

A field is a positional argument where `CLI_ARGUMENT` marks it, else an option spelled `--field-name` (a bool
that defaults to true also takes `--no-field-name`), or as its `flags` say."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo

from engine.config.json_types import json_types_as_declared
from engine.config.method import method_names
from engine.config.query_options import GenerationSettings, QueryOptions, known_measurement, option_field
from engine.config.serve import ServeConfig

CLI_ARGUMENT: JsonDict = {"cli": "argument"}

# `tributary eval --task`: the offline tasks engine.evaluation.tasks.load_task builds.
EVAL_TASKS = ("diabetes", "breast_cancer", "wine", "digits", "shakespeare")


def argument(description: str) -> Any:
    """A required positional argument."""
    return Field(description=description, json_schema_extra=CLI_ARGUMENT)


def option(default: Any, description: str, *flags: str, **bounds: Any) -> Any:
    """An option; `flags` spell it where `--field-name` would not (a short form, a `--x/--no-x` pair)."""
    return Field(
        default, description=description, json_schema_extra={"flags": list(flags)} if flags else None, **bounds
    )


def shared(options: type, name: str, needs: str = "", *flags: str) -> Any:
    """One of QueryOptions' or GenerationSettings' fields as a command option: its default, bounds and help
    (prefixed with the flags it needs), declared there once."""
    field: FieldInfo = option_field(options, name)
    if needs:
        field.description = f"{needs}: {field.description}"
    if flags:
        field.json_schema_extra = {"flags": list(flags)}
    return field


def serve_override(name: str, description: str) -> Any:
    """A `tributary serve` option that replaces one ServeConfig field; its help names the field's default."""
    default = ServeConfig.model_fields[name].default
    return Field(None, description=f"{description} (default serve.{name}, {default})")


def flags_of(name: str, field: FieldInfo) -> list[str]:
    """How the command line spells a field's option."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    declared = extra.get("flags")
    if isinstance(declared, list) and declared:
        return [str(flag) for flag in declared]
    flag = "--" + name.replace("_", "-")
    if field.default is True:
        return [f"{flag}/--no-{flag[2:]}"]
    return [flag]


def is_argument(field: FieldInfo) -> bool:
    return field.json_schema_extra == CLI_ARGUMENT


class CommandArgs(BaseModel):
    """The base of every command's arguments: an unknown field is an error; a value has its declared JSON type."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _types = json_types_as_declared()


def _method_option(what: str) -> Any:
    return option(None, f"{what}: {' | '.join(method_names())}")


class GlobalArgs(CommandArgs):
    """`tributary [--verbose] COMMAND`: what every command shares."""

    verbose: bool = option(False, "debug logging", "--verbose", "-v")


class IndexArgs(CommandArgs):
    config: str = argument("YAML job config")
    overwrite: bool = option(False, "replace a store built from different inputs", "--overwrite/--no-overwrite")
    progress: bool = option(True, "show progress bars")
    break_lock: bool = option(False, "remove another run's writer lock (only once that run is gone)")


class QueryArgs(CommandArgs):
    config: str = argument("YAML job config (the one the store was indexed with)")
    queries: str = Field(description="JSONL of {text} or {prompt, completion} rows ({prompt} with --generate)")
    top_k: int = shared(QueryOptions, "k")
    out: str | None = option(None, "results JSONL")
    scores_out: str | None = option(None, "full Q x N scores (.npy)")
    report: str | None = option(None, "self-contained HTML report")
    per_module: bool = shared(QueryOptions, "per_module")
    per_token: bool = shared(QueryOptions, "per_token")
    measurement: str = shared(QueryOptions, "measurement")
    method: str | None = _method_option("override method.name")
    generate: bool = option(False, option_field(QueryOptions, "generation").description)
    max_new_tokens: int = shared(GenerationSettings, "max_new_tokens", "--generate")
    sample: bool = shared(GenerationSettings, "sample", "--generate")
    temperature: float = shared(GenerationSettings, "temperature", "--generate --sample")
    top_p: float = shared(GenerationSettings, "top_p", "--generate --sample")
    seed: int = shared(GenerationSettings, "seed", "--generate --sample")
    chat: bool | None = shared(GenerationSettings, "chat", "--generate", "--chat/--no-chat")
    approximate: bool = shared(QueryOptions, "approximate")
    rerank: int = shared(QueryOptions, "rerank", "--approximate")
    exact: bool = option(False, "exact scores over every training row from a pass over them (needs exact.factors)")
    rescore: int | None = option(None, "the store's (--approximate: the ANN's) top and bottom K, re-scored as --exact")

    @field_validator("measurement")
    @classmethod
    def _known_measurement(cls, value: str) -> str:
        return known_measurement(value)

    def generation(self) -> GenerationSettings:
        """The generation flags as settings (checked with or without --generate: a bad value is an error)."""
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            sample=self.sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            chat=self.chat,
        )

    def options(self) -> QueryOptions:
        return QueryOptions(
            k=self.top_k,
            measurement=self.measurement,
            per_module=self.per_module,
            per_token=self.per_token,
            generation=self.generation() if self.generate else None,
            approximate=self.approximate,
            rerank=self.rerank,
        )


class PlanArgs(CommandArgs):
    config: str = argument("YAML job config")
    queries: str | None = option(None, "plan `tributary query` with this queries file")
    method: str | None = _method_option("override method.name")


class AnnBuildArgs(CommandArgs):
    store: str = argument("store path (a local one): the index is written to STORE.ann")
    metric: str = option("dot,cos", "dot (single-term methods but grad_cos), cos (grad_cos), or both")
    codec: str = option("SQ8", "FAISS IVF codec: SQ8, SQ4, Flat or PQ<m>")
    lists: int | None = option(None, "IVF cells (default: the square root of the rows)")
    probes: int | None = option(None, "cells searched per query (default: a quarter)")
    batch_rows: int | None = option(None, "rows encoded per resumable step (default: 32 MiB of float32 rows)")
    row_copy: bool = option(
        True, "keep an uncompressed copy of the rows beside the index, so the rerank reads only its candidates"
    )
    progress: bool = option(True, "show progress bars")


class ServeArgs(CommandArgs):
    config: str = argument("YAML job config (the one the store was indexed with)")
    host: str | None = serve_override("host", "address to bind")
    port: int | None = serve_override("port", "port")
    replicas: int | None = serve_override("replicas", "service replicas")

    def overrides(self) -> dict[str, Any]:
        """The ServeConfig fields given on the command line."""
        return {name: value for name, value in self.model_dump(exclude={"config"}).items() if value is not None}


class InfoArgs(CommandArgs):
    store: str = argument("store path or URL")
    verify: bool = option(False, "re-read every shard and check its checksum")


class DemoArgs(CommandArgs):
    workdir: str = option("runs/demo", "where the demo writes its data, adapter, store and report")
    small: bool = option(False, "generate 8 tokens a prompt instead of 32 (for tests)")
    toy: bool = option(False, "the seconds-long toy: a tiny GPT-2 on template sentences")
    retrain: bool = option(
        False,
        "fine-tune the LoRA adapter from its recipe with TributaryCallback, which writes the store as it trains "
        "(no index pass); --small: 16 steps",
    )
    exact: bool = option(False, "also fit full-width factors and print the store's top-10 overlap with exact EK-FAC's")


def _task(default: str) -> Any:
    return option(default, " | ".join(EVAL_TASKS))


def _workers(what: str) -> Any:
    return option(0, f"Ray workers{what} (0: in this process)")


class EvalLdsArgs(CommandArgs):
    task: str = _task("diabetes")
    methods: str = option("grad_dot,if,source", "comma-separated methods (and 'random')")
    alpha: float = option(0.5, "fraction of the training rows each subset keeps")
    subsets: int = option(40, "M random subsets")
    seeds: int = option(2, "R retraining seeds per subset")
    cache: str | None = option(None, "Zarr directory of the ground truth (reused next time)")
    workers: int = _workers(" for the retraining")
    projection_dim: int = option(0, "gradient projection per side (0: exact)")


class EvalGoldArgs(CommandArgs):
    task: str = _task("diabetes")
    methods: str = option("grad_dot,grad_cos,if,trak,source", "comma-separated methods")
    left_out: int = option(40, "left-out training examples")
    seeds: int = option(8, "S further-training seeds")
    steps: str = option("1,10,100,300", "further-training steps at which to compare")
    mode: str = option("remove", "remove (same batch order minus i) | every_batch")
    unpaired: bool = option(False, "independent batch orders (for comparison)")
    workers: int = _workers(" for the further training")


class EvalRemovalArgs(CommandArgs):
    task: str = _task("wine")
    methods: str = option("if,source,random", "comma-separated methods")
    k: str = option("5,10", "numbers of top supporters removed")
    seeds: int = option(2, "retraining seeds")
    workers: int = _workers("")


# Every command, by how it is typed after `tributary` ("" for the options before the command).
COMMAND_ARGS: dict[str, type[CommandArgs]] = {
    "": GlobalArgs,
    "index": IndexArgs,
    "query": QueryArgs,
    "plan": PlanArgs,
    "ann build": AnnBuildArgs,
    "serve": ServeArgs,
    "info": InfoArgs,
    "demo": DemoArgs,
    "eval lds": EvalLdsArgs,
    "eval gold": EvalGoldArgs,
    "eval removal": EvalRemovalArgs,
}


README_START = "<!-- command options: generated by `python -m engine.config.commands README.md`; do not edit -->"
README_END = "<!-- end of command options -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def option_tables() -> str:
    """README's "Command options" tables, one per command, from the models."""
    lines: list[str] = []
    for path, model in COMMAND_ARGS.items():
        arguments = [name.upper() for name, field in model.model_fields.items() if is_argument(field)]
        usage = " ".join(["tributary", *([path] if path else []), *arguments, *([] if path else ["COMMAND"])])
        lines += [f"`{usage}` ({model.__name__})", "", "| option | default | what |", "| --- | --- | --- |"]
        for name, field in model.model_fields.items():
            if is_argument(field):
                spelled, default = name.upper(), "required"
            else:
                spelled = ", ".join(flags_of(name, field))
                default = "required" if field.is_required() else f"`{field.default}`"
            lines.append(f"| `{_cell(spelled)}` | {_cell(default)} | {_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


def readme_with_tables(readme: str) -> str:
    """`readme` with the text between its command-options markers replaced by `option_tables()`."""
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[:start] + "\n\n" + option_tables() + "\n" + readme[end:]


if __name__ == "__main__":
    import sys
    from pathlib import Path

    target = Path(sys.argv[1])
    target.write_text(readme_with_tables(target.read_text()))
