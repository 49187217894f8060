"""The `tributary` command line: each subcommand reads a validated config and calls the library.

Every command's options are one pydantic model's fields (engine.config.commands): `_command` makes the typer
command from the model, so a flag, its default and its help are declared there once."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from engine.config import COMMAND_ARGS, EVAL_TASKS, CommandArgs, flags_of, is_argument
from engine.config.commands import (
    AnnBuildArgs,
    DemoArgs,
    EvalGoldArgs,
    EvalLdsArgs,
    EvalRemovalArgs,
    GlobalArgs,
    IndexArgs,
    InfoArgs,
    PlanArgs,
    QueryArgs,
    ServeArgs,
)
from engine.errors import TributaryError, shown
from engine.store.location import redact

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Tributary: which training examples made this model say this?"
)
console = Console(stderr=True)


_handler: logging.Handler | None = None


def _setup_logging(verbose: bool) -> None:
    """One Rich handler on the root logger; replaces only our own earlier one, never a host's handlers
    (an in-process caller, e.g. a notebook or pytest's caplog, keeps its logging)."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = RichHandler(console=console, show_path=False)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Object-store clients log request headers (with the access key id) at debug level: keep them quiet
    # even under --verbose, so credentials never reach a log.
    for noisy in (
        "httpx",
        "urllib3",
        "filelock",
        "botocore",
        "aiobotocore",
        "boto3",
        "s3fs",
        "fsspec",
        "aiohttp",
        "gcsfs",
        "google",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(error: Exception) -> None:
    # The message is plain text: escaped (a path like a[/]b is not Rich markup) and never re-wrapped,
    # so file paths and config keys in it stay whole and copyable.
    console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
    raise typer.Exit(code=2)


Args = TypeVar("Args", bound=CommandArgs)

# A refusal from QueryOptions names its field; `k` is the command line's --top-k.
_OPTION_FIELDS = {"k": "top_k"}


def _flag_problem(model: type[BaseModel], error: ValidationError) -> str:
    """A refused option value, named by its flag."""
    item = error.errors()[0]
    name = str(item["loc"][0]) if item["loc"] else ""
    name = _OPTION_FIELDS.get(name, name)
    field = model.model_fields.get(name)
    flag = flags_of(name, field)[0].split("/")[0] if field is not None else "--" + name.replace("_", "-")
    context = item.get("ctx", {})
    if item["type"] == "unknown_name":
        return f"{flag} {context['name']} is unknown; use one of {context['choices']}"
    if item["type"] == "greater_than" and context.get("gt") == 0:
        return f"{flag} must be positive, got {shown(item['input'])}"
    return f"{flag}: {item['msg']} (got {shown(item['input'])})"


def _parameter(name: str, field: Any) -> Any:
    if is_argument(field):
        return typer.Argument(..., help=field.description)
    default = ... if field.is_required() else field.default
    return typer.Option(default, *flags_of(name, field), help=field.description)


def _command(group: typer.Typer, path: str) -> Callable[[Callable[[Args], None]], Callable[[Args], None]]:
    """Register `body` as the command typed as `path` (COMMAND_ARGS' key): typer reads the parameters made from
    the model's fields; the values are validated by the model, a refusal is one line naming the flag."""
    model = COMMAND_ARGS[path]

    def register(body: Callable[[Args], None]) -> Callable[[Args], None]:
        parameters = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=_parameter(name, field), annotation=field.annotation
            )
            for name, field in model.model_fields.items()
        ]

        def handler(**values: Any) -> None:
            try:
                args = model(**values)
            except ValidationError as error:
                _fail(TributaryError(_flag_problem(model, error)))
            body(args)  # pyright: ignore[reportArgumentType]

        handler.__signature__ = inspect.Signature(parameters)  # pyright: ignore[reportFunctionMemberAccess]
        handler.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        handler.__name__, handler.__doc__ = body.__name__, body.__doc__
        if path:
            group.command(path.split()[-1])(handler)
        else:
            group.callback()(handler)
        return body

    return register


@_command(app, "")
def _global_options(args: GlobalArgs) -> None:
    _setup_logging(args.verbose)
    # Quiet start-up: no per-file weight-loading bars (our own bars show progress), and DeepSpeed, which
    # transformers imports when saving, need not probe for an accelerator on a machine without CUDA.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@_command(app, "index")
def index(args: IndexArgs) -> None:
    """Compute projected training gradients and curvature factors into the store."""
    from engine.config import load_config
    from engine.local_or_ray import run_index

    try:
        store = run_index(
            load_config(args.config), overwrite=args.overwrite, show_progress=args.progress, break_lock=args.break_lock
        )
    except TributaryError as error:
        _fail(error)
    console.print(f"store: {redact(store.path)} ({store.size_text()})")


@_command(app, "query")
def query(args: QueryArgs) -> None:
    """Score queries against every training example and keep the top-k supporters and opposers."""
    from engine.config import load_config, with_method_name
    from engine.local_or_ray import run_query

    try:
        try:  # the generation flags are checked with or without --generate: a bad value is an error either way
            args.generation()
            options = args.options()
        except ValidationError as error:
            raise TributaryError(_flag_problem(QueryArgs, error)) from None
        job = load_config(args.config)
        if args.method is not None:
            job = with_method_name(job, args.method, source=f"{args.config} with --method {args.method}")
        if args.exact or args.rescore is not None:
            _query_exact(job, args, options)
            return
        result = run_query(
            job,
            args.queries,
            args.top_k,
            out=args.out,
            scores_out=args.scores_out,
            options=options,
            report=args.report,
        )
    except TributaryError as error:
        _fail(error)
    console.print(f"scored {len(result.top_indices)} queries against every training row")
    for label, target in (("results", args.out), ("scores", args.scores_out), ("report", args.report)):
        if target:
            console.print(f"{label}: {target}")


@_command(app, "plan")
def plan(args: PlanArgs) -> None:
    """Print what `index` (or, with --queries, `query`) would run, read and write; loads no weights, writes nothing."""
    from engine.config import QueryOptions, load_config, with_method_name
    from engine.indexing.plan import describe_index_plan, resolve_index_plan
    from engine.query.plan import describe_query_plan, resolve_query_plan

    try:
        job = load_config(args.config)
        if args.method is not None:
            job = with_method_name(job, args.method, source=f"{args.config} with --method {args.method}")
        if args.queries is None:
            lines = describe_index_plan(resolve_index_plan(job))
        else:
            lines = describe_query_plan(resolve_query_plan(job, args.queries, QueryOptions()))
    except TributaryError as error:
        _fail(error)
    width = max(len(what) for what, _ in lines)
    for what, value in lines:
        typer.echo(f"{what.ljust(width)}  {value}")


def _query_exact(job, args: QueryArgs, options) -> None:
    from engine.local_or_ray import run_exact

    if args.report is not None:
        raise TributaryError("--report does not combine with --exact/--rescore yet; drop --report")
    result = run_exact(job, args.queries, options, out=args.out, scores_out=args.scores_out, rescore=args.rescore)
    console.print(f"scored {len(result.records)} queries exactly against {int(result.exact.sum())} training rows")
    for label, target in (("results", args.out), ("scores", args.scores_out)):
        if target:
            console.print(f"{label}: {target}")


ann_app = typer.Typer(no_args_is_help=True, help="The approximate top-k index beside a store (FAISS)")
app.add_typer(ann_app, name="ann")


@_command(ann_app, "ann build")
def ann_build(args: AnnBuildArgs) -> None:
    """Build (or resume) the FAISS index over the store's rows that `query --approximate` and the service use."""
    from engine.ann.build import build_index
    from engine.ann.layout import METRICS, index_location

    try:
        metrics = tuple(name.strip() for name in args.metric.split(",") if name.strip())
        unknown = [name for name in metrics if name not in METRICS]
        if unknown or not metrics:
            raise TributaryError(f"--metric {args.metric!r}: use dot, cos or dot,cos")
        record = build_index(
            args.store,
            metrics,  # type: ignore[arg-type]
            args.codec,
            args.lists,
            args.probes,
            args.progress,
            args.batch_rows,
            args.row_copy,
        )
    except TributaryError as error:
        _fail(error)
    settings = record.plan.settings
    console.print(
        f"ANN index: {index_location(args.store)} ({record.indexed_rows} rows; IVF{settings.lists},{settings.codec}, "
        f"{settings.probes} probes; {', '.join(record.files)})",
        soft_wrap=True,
    )


@_command(app, "serve")
def serve(args: ServeArgs) -> None:
    """Serve attribution over HTTP (Ray Serve): POST /v1/attribute, GET /v1/health, GET /v1/info."""
    from engine.config import load_config
    from engine.serving.service import serve_until_stopped, with_serve_options

    try:
        job = with_serve_options(
            load_config(args.config), f"{args.config} with command-line options", **args.overrides()
        )
        serve_until_stopped(
            job,
            on_ready=lambda url: console.print(
                f"serving {redact(job.store.path)} on {url} (API: {url}/docs); Ctrl-C stops it", soft_wrap=True
            ),
        )
    except TributaryError as error:
        _fail(error)


@_command(app, "info")
def info(args: InfoArgs) -> None:
    """Print a store's manifest and completeness; with --verify, check every shard's checksum."""
    from engine.store.opening import open_store
    from engine.store.summary import store_summary

    try:
        opened = open_store(args.store)
    except TributaryError as error:
        _fail(error)
    summary, problems = store_summary(opened, args.verify)
    if args.verify:  # the ANN index beside the store is checked with it (what an --approximate query ranks with)
        from engine.ann.integrity import index_problems

        problems = [*problems, *index_problems(args.store)]
        summary["verify"]["problems"] = problems
    _print_summary(summary, problems)


def _print_summary(summary: dict, problems: list[str]) -> None:
    """The store summary as JSON on stdout; verification problems on stderr, and exit code 1 if any."""
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    if problems:
        console.print(f"[bold red]verify:[/] {len(problems)} problem(s):")
        for problem in problems:
            console.print(f"  {escape(problem)}", soft_wrap=True)
        raise typer.Exit(code=1)


@_command(app, "demo")
def demo(args: DemoArgs) -> None:
    """End to end on the embedded default: SmolLM2 + LoRA on Shakespeare, Ray index, generations attributed."""
    try:
        _writable_workdir(args.workdir)
        if args.toy:
            from engine.demo_assets.toy import run_toy_demo

            run_toy_demo(args.workdir, small=args.small, exact=args.exact)
        else:
            from engine.demo import run_demo

            run_demo(args.workdir, small=args.small, retrain=args.retrain, exact=args.exact)
    except TributaryError as error:
        _fail(error)


def _writable_workdir(workdir: str) -> None:
    """Create the demo's --workdir, or refuse it before any work starts when it cannot be created or written."""
    from pathlib import Path

    root = Path(workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".tributary-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise TributaryError(
            f"--workdir {workdir}: cannot create or write it ({error.strerror or error}); choose a folder you can "
            "write, e.g. --workdir runs/demo"
        ) from None


eval_app = typer.Typer(
    no_args_is_help=True,
    help=f"Evaluate methods: LDS, FiMO's gold standard, subset removal (offline tasks: {', '.join(EVAL_TASKS)})",
)
app.add_typer(eval_app, name="eval")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TributaryError(f"{option} {text!r} must be comma-separated integers, e.g. 1,10,100") from None


def _print_json(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2))


@_command(eval_app, "eval lds")
def eval_lds(args: EvalLdsArgs) -> None:
    """Linear datamodeling score of each method (mean, bootstrap 95% CI over queries)."""
    from engine.evaluation.commands import run_lds

    try:
        _print_json(
            run_lds(
                args.task,
                args.methods.split(","),
                args.alpha,
                args.subsets,
                args.seeds,
                args.cache,
                args.workers,
                args.projection_dim,
            )
        )
    except TributaryError as error:
        _fail(error)


@_command(eval_app, "eval gold")
def eval_gold(args: EvalGoldArgs) -> None:
    """Cosine and Spearman of each method against FiMO's further-training gold standard, per step."""
    from engine.evaluation.commands import run_gold

    try:
        steps = _integers(args.steps, "--steps")
        _print_json(
            run_gold(
                args.task,
                args.methods.split(","),
                args.left_out,
                args.seeds,
                steps,
                args.mode,
                not args.unpaired,
                args.workers,
            )
        )
    except TributaryError as error:
        _fail(error)


@_command(eval_app, "eval removal")
def eval_removal(args: EvalRemovalArgs) -> None:
    """Remove each query's top-k supporters, retrain, report queries flipped (or the loss increase)."""
    from engine.evaluation.commands import run_removal

    try:
        _print_json(run_removal(args.task, args.methods.split(","), _integers(args.k, "--k"), args.seeds, args.workers))
    except TributaryError as error:
        _fail(error)


if __name__ == "__main__":
    app()
