"""A query run resolved once, before any model loads: the store, the method, the final model, the queries and
the outputs, with every check that can fail on the config and the request alone.

`resolve_query_plan` is the only place `tributary query` (engine.query.plan_and_score.plan_and_score) opens the store, builds
the method, picks the final model and reads the queries file; the run then only consumes the plan.
`tributary plan CONFIG --queries Q` prints one without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from engine.ann.index import AnnIndex
from engine.config import JobConfig, QueryOptions
from engine.config.capabilities import Feature
from engine.data.rows import Row, field_names, read_rows
from engine.errors import TributaryError
from engine.query.attributor import check_method, final_model, open_complete_store
from engine.query.generate import PromptRow, read_prompts
from engine.spectral.methods import Method, method_from_config
from engine.store import GradientStore
from engine.store.location import redact
from engine.store.run_store import RunStore
from engine.store.sizes import format_bytes, rows_bytes


@dataclass(frozen=True)
class QueryOutputs:
    """The files a query run writes, all at once and only when every query succeeded."""

    out: str | None = None  # results JSONL
    scores_out: str | None = None  # the full (queries x rows) scores, .npy
    report: str | None = None  # the HTML report

    def check(self) -> None:
        for option, target in (("--out", self.out), ("--scores-out", self.scores_out)):
            if target is not None and Path(target).is_dir():
                raise TributaryError(f"{option} {target} is a directory; give a file path")
        if (
            self.out is not None
            and self.scores_out is not None
            and Path(self.out).resolve() == Path(self.scores_out).resolve()
        ):
            raise TributaryError(f"--out and --scores-out are both {self.out}; give two different files")

    def paths(self) -> list[str]:
        return [path for path in (self.out, self.scores_out, self.report) if path is not None]


@dataclass(frozen=True)
class QueryPlan:
    config: JobConfig
    opened: GradientStore | RunStore  # the store as opened: a training run's, or a single-checkpoint one
    final_config: JobConfig  # the final model's config (a training run's last checkpoint)
    store: GradientStore  # the final model's store
    method: Method
    options: QueryOptions
    queries_path: str
    rows: list[Row] | None  # the queries file, read once (None when the queries are generated from prompts)
    prompts: list[PromptRow] | None  # with options.generation: the prompts to complete
    outputs: QueryOutputs

    @property
    def need_full(self) -> bool:
        """Whether the full score matrix is kept (for --scores-out), not only each query's top and bottom k."""
        return self.outputs.scores_out is not None

    @property
    def query_count(self) -> int:
        return len(self.prompts if self.prompts is not None else self.rows or [])

    @property
    def uses_ann_index(self) -> bool:
        return self.options.approximate and not self.need_full and self.method.build_terms is None


def resolve_query_plan(
    config: JobConfig, queries_path: str, options: QueryOptions, outputs: QueryOutputs = QueryOutputs()
) -> QueryPlan:
    """Every check that needs neither the model nor the machine, in the order a user meets them; nothing is
    written. The placement's devices are checked where the replicas start (engine.model.placement)."""
    if options.k <= 0:
        raise TributaryError(f"--top-k must be positive, got {options.k}")
    outputs.check()
    opened = open_complete_store(config.store.path)
    method = method_from_config(config.method)
    check_method(config, opened, method, query_features(options))
    rows, prompts = None, None
    if options.generation is not None:  # read (and validate) the queries file before the model loads
        prompts = read_prompts(queries_path, config.data.prompt_field, config.data.id_field)
    else:
        rows = read_rows(queries_path, field_names(config), what="queries file")
    final_config, store = final_model(config, opened)
    plan = QueryPlan(config, opened, final_config, store, method, options, queries_path, rows, prompts, outputs)
    if plan.uses_ann_index:
        AnnIndex(config.store.path, store)  # a missing or stale index: refused before the model loads
    return plan


def query_features(options: QueryOptions) -> tuple[Feature, ...]:
    """The features of engine.config.capabilities a query run's options ask for."""
    features: list[Feature] = []
    if options.per_token:
        features.append("per_token")
    if options.generation is not None:
        features.append("generate")
    return tuple(features)


def with_top_k(options: QueryOptions | None, k: int, per_module: bool) -> QueryOptions:
    """`tributary query`'s options with --top-k (and, without other options, --per-module) applied."""
    return replace(options, k=k) if options is not None else QueryOptions(k=k, per_module=per_module)


def describe_query_plan(plan: QueryPlan) -> list[tuple[str, str]]:
    """What the run would do, as (what, value) lines for `tributary plan`."""
    manifest = plan.store.manifest
    return [
        ("command", "query"),
        ("method", plan.method.name),
        ("model", plan.final_config.model.path + ("" if plan.opened is plan.store else " (final checkpoint)")),
        ("placement", _placement(plan.config)),
        ("store", redact(plan.opened.path)),
        (
            "queries",
            f"{plan.query_count} from {plan.queries_path}" + (" (prompts to complete)" if plan.prompts else ""),
        ),
        ("measurement", plan.options.measurement),
        ("top k", str(plan.options.k)),
        ("training rows", str(manifest.rows)),
        ("row width", f"{manifest.width} ({manifest.dtype})"),
        (
            "store bytes",
            f"{format_bytes(rows_bytes(manifest.rows, manifest.width, manifest.dtype))} of rows, read once per scoring pass",
        ),
        ("ranking", "ANN index, then exact re-scoring" if plan.uses_ann_index else "exact scan of the stored rows"),
        ("reads", f"{redact(plan.opened.path)}, {plan.queries_path}"),
        ("writes", ", ".join(plan.outputs.paths()) or "nothing (no --out, --scores-out or --report)"),
    ]


def _placement(config: JobConfig) -> str:
    placement = config.placement
    where = "in this process" if config.cluster is None else f"on Ray ({config.cluster.address})"
    return f"{placement.kind} x{placement.devices_per_replica}, {config.weights_dtype}, {where}"
