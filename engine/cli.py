"""The `tributary` command line: each subcommand reads a validated config and calls the library."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from engine.config import GenerationSettings, QueryOptions, method_names, option_field
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


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    _setup_logging(verbose)
    # Quiet start-up: no per-file weight-loading bars (our own bars show progress), and DeepSpeed, which
    # transformers imports when saving, need not probe for an accelerator on a machine without CUDA.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@app.command()
def index(
    config: str = typer.Argument(..., help="YAML job config"),
    overwrite: bool = typer.Option(False, help="replace a store built from different inputs"),
    progress: bool = typer.Option(True, help="show progress bars"),
    break_lock: bool = typer.Option(
        False, "--break-lock", help="remove another run's writer lock (only once that run is gone)"
    ),
) -> None:
    """Compute projected training gradients and curvature factors into the store."""
    from engine.config import load_config
    from engine.runner import run_index

    try:
        store = run_index(load_config(config), overwrite=overwrite, show_progress=progress, break_lock=break_lock)
    except TributaryError as error:
        _fail(error)
    console.print(f"store: {redact(store.path)} ({store.size_text()})")


# The query options' defaults and help come from engine.config's QueryOptions and GenerationSettings (the
# service's request body reads the same fields); `--top-k` is QueryOptions.k, every other flag is its field.
_FLAGS = {"k": "--top-k"}


def _option(options: type, name: str, *flags: str, needs: str = "") -> Any:
    field = option_field(options, name)
    return typer.Option(field.default, *flags, help=f"{needs}: {field.description}" if needs else field.description)


def _flag_problem(error: ValidationError) -> str:
    """A refused option value, named by its flag."""
    item = error.errors()[0]
    name = str(item["loc"][-1])
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if item["type"] == "greater_than" and item.get("ctx", {}).get("gt") == 0:
        return f"{flag} must be positive, got {item['input']}"
    return f"{flag}: {item['msg']} (got {item['input']!r})"


@app.command()
def query(
    config: str = typer.Argument(..., help="YAML job config (the one the store was indexed with)"),
    queries: str = typer.Option(
        ..., "--queries", help="JSONL of {text} or {prompt, completion} rows ({prompt} with --generate)"
    ),
    top_k: int = _option(QueryOptions, "k", "--top-k"),
    out: str | None = typer.Option(None, "--out", help="results JSONL"),
    scores_out: str | None = typer.Option(None, "--scores-out", help="full Q x N scores (.npy)"),
    report: str | None = typer.Option(None, "--report", help="self-contained HTML report"),
    per_module: bool = _option(QueryOptions, "per_module", "--per-module"),
    per_token: bool = _option(QueryOptions, "per_token", "--per-token"),
    measurement: str = _option(QueryOptions, "measurement", "--measurement"),
    method: str | None = typer.Option(None, "--method", help=f"override method.name: {' | '.join(method_names())}"),
    generate: bool = typer.Option(False, "--generate", help=option_field(QueryOptions, "generation").description),
    max_new_tokens: int = _option(GenerationSettings, "max_new_tokens", "--max-new-tokens", needs="--generate"),
    sample: bool = _option(GenerationSettings, "sample", "--sample", needs="--generate"),
    temperature: float = _option(GenerationSettings, "temperature", "--temperature", needs="--generate --sample"),
    top_p: float = _option(GenerationSettings, "top_p", "--top-p", needs="--generate --sample"),
    seed: int = _option(GenerationSettings, "seed", "--seed", needs="--generate --sample"),
    chat: bool | None = _option(GenerationSettings, "chat", "--chat/--no-chat", needs="--generate"),
    approximate: bool = _option(QueryOptions, "approximate", "--approximate"),
    rerank: int = _option(QueryOptions, "rerank", "--rerank", needs="--approximate"),
    exact: bool = typer.Option(
        False, "--exact", help="exact scores over every training row from a pass over them (needs exact.factors)"
    ),
    rescore: int | None = typer.Option(
        None, "--rescore", help="the store's (--approximate: the ANN's) top and bottom K, re-scored as --exact"
    ),
) -> None:
    """Score queries against every training example and keep the top-k supporters and opposers."""
    from engine.capture.measurement import MEASUREMENTS
    from engine.config import load_config, with_method_name
    from engine.runner import run_query

    try:
        if measurement not in MEASUREMENTS:
            raise TributaryError(f"--measurement {shown(measurement)} is unknown; use one of {', '.join(MEASUREMENTS)}")
        try:  # the generation flags are checked with or without --generate: a bad value is an error either way
            generation = GenerationSettings(
                max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p, seed=seed, chat=chat
            )
            options = QueryOptions(
                k=top_k,
                measurement=measurement,
                per_module=per_module,
                per_token=per_token,
                generation=generation if generate else None,
                approximate=approximate,
                rerank=rerank,
            )
        except ValidationError as error:
            raise TributaryError(_flag_problem(error)) from None
        job = load_config(config)
        if method is not None:
            job = with_method_name(job, method, source=f"{config} with --method {method}")
        if exact or rescore is not None:
            _query_exact(job, queries, options, out, scores_out, report, rescore)
            return
        result = run_query(job, queries, top_k, out=out, scores_out=scores_out, options=options, report=report)
    except TributaryError as error:
        _fail(error)
    console.print(f"scored {len(result.top_indices)} queries against every training row")
    for label, target in (("results", out), ("scores", scores_out), ("report", report)):
        if target:
            console.print(f"{label}: {target}")


@app.command()
def plan(
    config: str = typer.Argument(..., help="YAML job config"),
    queries: str | None = typer.Option(None, "--queries", help="plan `tributary query` with this queries file"),
    method: str | None = typer.Option(None, "--method", help=f"override method.name: {' | '.join(method_names())}"),
) -> None:
    """Print what `index` (or, with --queries, `query`) would run, read and write; loads no weights, writes nothing."""
    from engine.config import load_config, with_method_name
    from engine.indexing.plan import describe_index_plan, resolve_index_plan
    from engine.query.plan import describe_query_plan, resolve_query_plan

    try:
        job = load_config(config)
        if method is not None:
            job = with_method_name(job, method, source=f"{config} with --method {method}")
        if queries is None:
            lines = describe_index_plan(resolve_index_plan(job))
        else:
            lines = describe_query_plan(resolve_query_plan(job, queries, QueryOptions()))
    except TributaryError as error:
        _fail(error)
    width = max(len(what) for what, _ in lines)
    for what, value in lines:
        typer.echo(f"{what.ljust(width)}  {value}")


def _query_exact(job, queries: str, options, out, scores_out, report, rescore: int | None) -> None:
    from engine.runner import run_exact

    if report is not None:
        raise TributaryError("--report does not combine with --exact/--rescore yet; drop --report")
    result = run_exact(job, queries, options, out=out, scores_out=scores_out, rescore=rescore)
    console.print(f"scored {len(result.records)} queries exactly against {int(result.exact.sum())} training rows")
    for label, target in (("results", out), ("scores", scores_out)):
        if target:
            console.print(f"{label}: {target}")


ann_app = typer.Typer(no_args_is_help=True, help="The approximate top-k index beside a store (FAISS)")
app.add_typer(ann_app, name="ann")


@ann_app.command("build")
def ann_build(
    store: str = typer.Argument(..., help="store path (a local one): the index is written to STORE.ann"),
    metric: str = typer.Option(
        "dot,cos", "--metric", help="dot (single-term methods but grad_cos), cos (grad_cos), or both"
    ),
    codec: str = typer.Option("SQ8", "--codec", help="FAISS IVF codec: SQ8, SQ4, Flat or PQ<m>"),
    lists: int | None = typer.Option(None, "--lists", help="IVF cells (default: the square root of the rows)"),
    probes: int | None = typer.Option(None, "--probes", help="cells searched per query (default: a quarter)"),
    batch_rows: int | None = typer.Option(
        None, "--batch-rows", help="rows encoded per resumable step (default: 32 MiB of float32 rows)"
    ),
    row_copy: bool = typer.Option(
        True, help="keep an uncompressed copy of the rows beside the index, so the rerank reads only its candidates"
    ),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Build (or resume) the FAISS index over the store's rows that `query --approximate` and the service use."""
    from engine.ann.build import build_index
    from engine.ann.layout import METRICS, index_location

    try:
        metrics = tuple(name.strip() for name in metric.split(",") if name.strip())
        unknown = [name for name in metrics if name not in METRICS]
        if unknown or not metrics:
            raise TributaryError(f"--metric {metric!r}: use dot, cos or dot,cos")
        record = build_index(store, metrics, codec, lists, probes, progress, batch_rows, row_copy)  # type: ignore[arg-type]
    except TributaryError as error:
        _fail(error)
    settings = record.plan.settings
    console.print(
        f"ANN index: {index_location(store)} ({record.indexed_rows} rows; IVF{settings.lists},{settings.codec}, "
        f"{settings.probes} probes; {', '.join(record.files)})",
        soft_wrap=True,
    )


@app.command()
def serve(
    config: str = typer.Argument(..., help="YAML job config (the one the store was indexed with)"),
    host: str | None = typer.Option(None, "--host", help="address to bind (default serve.host, 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", help="port (default serve.port, 8000)"),
    replicas: int | None = typer.Option(None, "--replicas", help="service replicas (default serve.replicas, 1)"),
) -> None:
    """Serve attribution over HTTP (Ray Serve): POST /v1/attribute, GET /v1/health, GET /v1/info."""
    from engine.config import load_config
    from engine.serving.service import serve_until_stopped, with_serve_options

    try:
        job = with_serve_options(
            load_config(config), f"{config} with command-line options", host=host, port=port, replicas=replicas
        )
        serve_until_stopped(
            job,
            on_ready=lambda url: console.print(
                f"serving {redact(job.store.path)} on {url} (API: {url}/docs); Ctrl-C stops it", soft_wrap=True
            ),
        )
    except TributaryError as error:
        _fail(error)


@app.command()
def info(
    store: str = typer.Argument(..., help="store path or URL"),
    verify: bool = typer.Option(False, "--verify", help="re-read every shard and check its checksum"),
) -> None:
    """Print a store's manifest and completeness; with --verify, check every shard's checksum."""
    from engine.store.opening import open_store
    from engine.store.summary import store_summary

    try:
        opened = open_store(store)
    except TributaryError as error:
        _fail(error)
    summary, problems = store_summary(opened, verify)
    if verify:  # the ANN index beside the store is checked with it (what an --approximate query ranks with)
        from engine.ann.integrity import index_problems

        problems = [*problems, *index_problems(store)]
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


@app.command()
def demo(
    workdir: str = typer.Option("runs/demo", help="where the demo writes its data, adapter, store and report"),
    small: bool = typer.Option(False, "--small", help="generate 8 tokens a prompt instead of 32 (for tests)"),
    toy: bool = typer.Option(False, "--toy", help="the seconds-long toy: a tiny GPT-2 on template sentences"),
    retrain: bool = typer.Option(
        False,
        "--retrain",
        help="fine-tune the LoRA adapter from its recipe with TributaryCallback, which writes the store as it "
        "trains (no index pass); --small: 16 steps",
    ),
) -> None:
    """End to end on the embedded default: SmolLM2 + LoRA on Shakespeare, Ray index, generations attributed."""
    try:
        _writable_workdir(workdir)
        if toy:
            from engine.demo_assets.toy import run_toy_demo

            run_toy_demo(workdir, small=small)
        else:
            from engine.demo import run_demo

            run_demo(workdir, small=small, retrain=retrain)
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
    help="Evaluate methods: LDS, FiMO's gold standard, subset removal "
    "(offline tasks: diabetes, breast_cancer, wine, digits, shakespeare)",
)
app.add_typer(eval_app, name="eval")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TributaryError(f"{option} {text!r} must be comma-separated integers, e.g. 1,10,100") from None


def _print_json(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2))


@eval_app.command("lds")
def eval_lds(
    task: str = typer.Option("diabetes", help="diabetes | breast_cancer | wine | digits | shakespeare"),
    methods: str = typer.Option("grad_dot,if,source", help="comma-separated methods (and 'random')"),
    alpha: float = typer.Option(0.5, help="fraction of the training rows each subset keeps"),
    subsets: int = typer.Option(40, help="M random subsets"),
    seeds: int = typer.Option(2, help="R retraining seeds per subset"),
    cache: str | None = typer.Option(None, help="Zarr directory of the ground truth (reused next time)"),
    workers: int = typer.Option(0, help="Ray workers for the retraining (0: in this process)"),
    projection_dim: int = typer.Option(0, help="gradient projection per side (0: exact)"),
) -> None:
    """Linear datamodeling score of each method (mean, bootstrap 95% CI over queries)."""
    from engine.evaluation.commands import run_lds

    try:
        _print_json(run_lds(task, methods.split(","), alpha, subsets, seeds, cache, workers, projection_dim))
    except TributaryError as error:
        _fail(error)


@eval_app.command("gold")
def eval_gold(
    task: str = typer.Option("diabetes", help="diabetes | breast_cancer | wine | digits | shakespeare"),
    methods: str = typer.Option("grad_dot,grad_cos,if,trak,source", help="comma-separated methods"),
    left_out: int = typer.Option(40, help="left-out training examples"),
    seeds: int = typer.Option(8, help="S further-training seeds"),
    steps: str = typer.Option("1,10,100,300", help="further-training steps at which to compare"),
    mode: str = typer.Option("remove", help="remove (same batch order minus i) | every_batch"),
    unpaired: bool = typer.Option(False, "--unpaired", help="independent batch orders (for comparison)"),
    workers: int = typer.Option(0, help="Ray workers for the further training (0: in this process)"),
) -> None:
    """Cosine and Spearman of each method against FiMO's further-training gold standard, per step."""
    from engine.evaluation.commands import run_gold

    try:
        _print_json(
            run_gold(
                task, methods.split(","), left_out, seeds, _integers(steps, "--steps"), mode, not unpaired, workers
            )
        )
    except TributaryError as error:
        _fail(error)


@eval_app.command("removal")
def eval_removal(
    task: str = typer.Option("wine", help="diabetes | breast_cancer | wine | digits | shakespeare"),
    methods: str = typer.Option("if,source,random", help="comma-separated methods"),
    k: str = typer.Option("5,10", help="numbers of top supporters removed"),
    seeds: int = typer.Option(2, help="retraining seeds"),
    workers: int = typer.Option(0, help="Ray workers (0: in this process)"),
) -> None:
    """Remove each query's top-k supporters, retrain, report queries flipped (or the loss increase)."""
    from engine.evaluation.commands import run_removal

    try:
        _print_json(run_removal(task, methods.split(","), _integers(k, "--k"), seeds, workers))
    except TributaryError as error:
        _fail(error)


if __name__ == "__main__":
    app()
