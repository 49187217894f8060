"""The job configuration: a YAML file validated by pydantic; an unknown key is an error that names it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass as options_dataclass
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic_core import PydanticCustomError

from engine.errors import TributaryError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    path: str = Field(description="HF model directory (or a hub id already in the local cache)")
    tokenizer: str | None = Field(default=None, description="tokenizer directory; default model.path")
    adapter: str | None = Field(default=None, description="peft adapter directory; gradients of adapter weights only")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    modules: list[str] | None = Field(
        default=None,
        description="fnmatch patterns of tracked module names; default: every supported module "
        "except lm_head and embeddings",
    )
    include_bias: bool = Field(default=True, description="treat a bias as a constant-1 input column (as kronfluence)")
    adapter_mode: Literal["adapter", "merged", "base"] = Field(
        default="adapter",
        description="with an adapter: attribute its weights (adapter), the merged model's weights "
        "(merged: adapter folded into the base), or the base model alone (base: adapter checked, not applied)",
    )


class DataConfig(_Section):
    train: str = Field(description="training JSONL: rows {text}, {prompt, completion} or {messages}, optional id")
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = Field(
        default="messages",
        description="chat rows: a list of {role: system|user|assistant, content}, rendered with the "
        "tokenizer's chat template; only assistant tokens carry loss",
    )
    id_field: str = "id"
    max_length: int = Field(default=512, gt=1)
    batch_size: int = Field(default=8, gt=0)
    padding_side: Literal["right", "left"] = "right"
    on_nonfinite: Literal["error", "skip"] = Field(
        default="error",
        description="a training row whose gradient, loss or curvature statistics are NaN/inf: error (stop, naming "
        "the row and modules) or skip (store it as zeros, leave it out of the curvature sums and of every ranking, "
        "and list it in the manifest's `skipped`)",
    )


class ProjectionBudget(_Section):
    numbers_per_row: int = Field(gt=0, description="stored numbers per row, split over the modules")
    measured_on: str = Field(
        description="a store with full-width factors (`exact: {factors: true}`, or projection.dim 0) of the same "
        "model and modules: its Λ gives each module's effective dimension Σ Λ/(Λ+λ), by which the budget is split"
    )


class ProjectionConfig(_Section):
    dim: int = Field(default=16, ge=0, description="per-side projection width k; 0 = identity (exact)")
    seed: int = 0
    kind: Literal["rademacher", "gaussian", "kfac_eigen", "eigen_sketch"] = Field(
        default="rademacher",
        description="rademacher/gaussian: seeded random matrices; kfac_eigen: each side's top-k eigenvectors of "
        "its K-FAC covariance (fitted by a pass before the gradients); eigen_sketch: the top `top` eigenvectors "
        "and a seeded random sketch of their orthogonal complement",
    )
    fit_rows: int | None = Field(
        default=None,
        gt=0,
        description="kfac_eigen/eigen_sketch: fit the covariances on about this many rows (every ⌈N/fit_rows⌉-th "
        "row); default all rows",
    )
    top: int | None = Field(
        default=None,
        gt=0,
        description="eigen_sketch: eigen-directions kept per side (the rest of dim is the sketch); default dim // 2",
    )
    fit: Literal["exact", "sketch"] = Field(
        default="exact",
        description="kfac_eigen/eigen_sketch: how each side's eigenvectors are found. exact: from the full d x d "
        "covariance (d² products per token, d² floats per module and shard); sketch: from a one-pass Nyström "
        "sketch of width 4 x the eigenvectors kept (4kd products and floats), exact where that is not narrower",
    )
    budget: ProjectionBudget | None = Field(
        default=None,
        description="in place of dim: numbers_per_row split over the modules by effective dimension (random kinds; "
        "engine.projection.budget)",
    )

    @model_validator(mode="after")
    def _fitted_options(self) -> ProjectionConfig:
        if self.budget is not None and "dim" in self.model_fields_set:
            raise PydanticCustomError("projection_options", "budget replaces dim; remove one of them")
        if self.budget is not None and self.kind not in ("rademacher", "gaussian"):
            raise PydanticCustomError("projection_options", "budget is for kind rademacher or gaussian")
        fitted = self.kind in ("kfac_eigen", "eigen_sketch")
        if not fitted and (self.fit_rows is not None or self.top is not None or self.fit != "exact"):
            raise PydanticCustomError(
                "projection_options",
                "fit_rows, top and fit are for kind kfac_eigen or eigen_sketch; remove them or change projection.kind",
            )
        if self.top is not None and self.kind != "eigen_sketch":
            raise PydanticCustomError("projection_options", "top is for kind eigen_sketch; remove it")
        if self.top is not None and self.dim and self.top >= self.dim:
            raise PydanticCustomError(
                "projection_options", "top must be below dim (the rest of each side is the random sketch)"
            )
        return self


class CurvatureConfig(_Section):
    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = "ekfac"
    fisher: Literal[True, "empirical"] = Field(
        default=True, description="true: labels sampled from the model (Gauss-Newton); empirical: the data's labels"
    )
    seed: int = 0
    lambdas: Literal["auto", "store", "model"] = Field(
        default="auto",
        description="where EK-FAC/diagonal Λ comes from: store (a read of the stored rows, or of the sampled-label "
        "rows pass 1 wrote as fisher_grads), model (a second forward+backward), auto (store unless store.dtype "
        "is float16/bfloat16 or, with the true Fisher, projection.dim is 0: fisher_grads would copy the full rows)",
    )

    @field_validator("fisher", mode="before")
    @classmethod
    def _fisher_words(cls, value: object) -> object:
        if value == "true":
            return True
        if value is False or value == "false":
            raise ValueError("fisher must be true (sampled labels) or 'empirical'")
        return value


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method as the layers below its implementation see it. Every method is declared here, once: the
    config schema, `tributary query --method`, the service's validation and `engine.evaluation` read this
    list, and engine/spectral/methods.py registers one implementation per name (a test checks both sets
    and the README's methods table agree)."""

    name: str
    training_run: bool  # scores along the training run's checkpoints (the others score the final model)


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("grad_dot", training_run=False),
    MethodSpec("grad_cos", training_run=False),
    MethodSpec("if", training_run=False),
    MethodSpec("source", training_run=True),
    MethodSpec("fast_source", training_run=True),
    MethodSpec("tracin", training_run=True),
    MethodSpec("trak", training_run=False),
    MethodSpec("datainf", training_run=False),
)


def method_names() -> tuple[str, ...]:
    """Every method a config (and a request) may name: the values `method.name` accepts."""
    return tuple(spec.name for spec in METHODS)


def unknown_method(name: object) -> str:
    """The message for a method name nobody declared, naming every one that is."""
    return f"unknown method {name!r}; use one of {', '.join(method_names())}"


class MethodConfig(_Section):
    name: str = Field(
        default="if",
        description=f"the attribution method: {' | '.join(method_names())}",
        json_schema_extra={"enum": list(method_names())},
    )
    damping: float | None = Field(
        default=None,
        ge=0,
        description="if / trak: damping (null = 0.1 x mean eigenvalue per module); datainf: λ for "
        "every module (null = 0.1 x mean squared gradient norm / width, per module)",
    )
    eta: float | None = Field(default=None, gt=0, description="Source, one segment: mean learning rate of the segment")
    steps: int | None = Field(default=None, gt=0, description="Source, one segment: number of optimizer steps K")
    form: Literal["exponential", "discrete"] = Field(
        default="exponential", description="Source: (1-exp(-eta K l))/l, or the K-step form (1-(1-eta l)^K)/l"
    )

    @field_validator("name")
    @classmethod
    def _declared(cls, value: str) -> str:
        if value not in method_names():
            raise PydanticCustomError("unknown_method", "{message}", {"message": unknown_method(value)})
        return value


class CheckpointConfig(_Section):
    path: str = Field(description="HF model directory of this checkpoint")
    learning_rate: float | None = Field(
        default=None, gt=0, description="learning rate at this checkpoint (TracInCP's η_c)"
    )
    step: int | None = Field(default=None, ge=0, description="optimizer step of this checkpoint")


class SegmentConfig(_Section):
    checkpoints: list[str | int] = Field(
        description="the segment's checkpoints: paths or indices into training_run.checkpoints"
    )
    steps: int | None = Field(default=None, gt=0, description="optimizer steps K in the segment (default: from steps)")
    learning_rate: float | None = Field(default=None, gt=0, description="mean learning rate over the segment")
    data: str | None = Field(
        default=None, description="this stage's training JSONL (continual training); default data.train"
    )


class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum β: Source uses η/(1-β)")
    preconditioned: bool = Field(
        default=False,
        description="adam/adamw: Source with P·H, P = 1/(sqrt(v̂)+eps) from each checkpoint's optimizer state",
    )
    state_file: str = Field(default="optimizer.pt", description="optimizer state file inside each checkpoint directory")
    beta2: float | None = Field(default=None, gt=0, lt=1, description="Adam β2 (default: from the optimizer state)")
    eps: float | None = Field(default=None, gt=0, description="Adam ε (default: from the optimizer state)")


class TrainingRunConfig(_Section):
    checkpoints: list[str | CheckpointConfig] = Field(
        default_factory=list, description="checkpoints in training order: HF directories or {path, learning_rate, step}"
    )
    trainer_dir: str | None = Field(
        default=None,
        description="an HF Trainer output_dir: its checkpoint-STEP directories (and the final model in the "
        "directory itself), learning rates from trainer_state.json",
    )
    segments: int | list[SegmentConfig] = Field(
        default=1, description="number of equal groups of checkpoints, or the segments/stages listed"
    )
    boundaries: list[int] | None = Field(
        default=None,
        description="stage boundaries in optimizer steps (instead of segments): checkpoint steps in "
        "(T_l-1, T_l] form segment l",
    )
    learning_rate: float | None = Field(
        default=None, gt=0, description="constant learning rate, when not given otherwise"
    )
    total_steps: int | None = Field(
        default=None, gt=0, description="the step the last segment ends at (default: its last checkpoint's step)"
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    averaged: bool = Field(default=False, description="also index each segment's averaged parameters (Fast-Source)")


class StoreConfig(_Section):
    path: str
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    rows_per_chunk: int | None = Field(
        default=None,
        gt=0,
        description="rows per Zarr chunk (a shard); default ~16 MiB, at least data.batch_size rows, and for "
        "K-FAC/EK-FAC/diagonal enough batches that the shard's partial sums are a quarter of its rows (to 512 MiB)",
    )
    keep_fisher_grads: bool = Field(
        default=False,
        description="keep the sampled-label rows (fisher_grads) pass 1 writes for Λ once the factors are final "
        "(a training run's segment Λ then reads them instead of running the model again)",
    )


class PlacementConfig(_Section):
    """How one replica (one copy of the model) is held: on one device, split across devices by accelerate, or
    partitioned over a group of ranks by DeepSpeed ZeRO-3."""

    kind: Literal["single", "device_map", "zero3"] = Field(
        default="single",
        description="single: the whole model on one device; device_map: accelerate spreads its layers over "
        "devices_per_replica GPUs (and CPU / disk with offload); zero3: a group of devices_per_replica Ray actors "
        "holds it partitioned with DeepSpeed ZeRO-3",
    )
    devices_per_replica: int = Field(
        default=1, gt=0, description="GPUs per replica; on a CPU-only machine, the ranks of a zero3 group"
    )
    offload: str | None = Field(
        default=None, description="device_map: null, cpu, or a directory for accelerate's disk offload"
    )
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = Field(
        default=None, description="compute dtype of the weights (default model.dtype); projections stay float32"
    )
    max_memory: dict[str, str | int] | None = Field(
        default=None,
        description="device_map: accelerate's memory cap per device, e.g. {0: 70GiB, cpu: 200GiB} (default: the "
        "free memory of each GPU, 80% of the available RAM); what does not fit goes to the next device, then disk",
    )


class ClusterConfig(_Section):
    address: str = Field(
        default="local", description="local (start Ray here), auto (join the running cluster) or HOST:PORT"
    )
    workers: int | None = Field(
        default=None, gt=0, description="actors; default one per GPU, or CPUs / cpus_per_worker"
    )
    gpus_per_worker: float = Field(default=1, ge=0, description="GPUs per actor (ignored on CPU-only clusters)")
    cpus_per_worker: int = Field(default=1, gt=0, description="CPUs per actor, also its torch thread count")
    local_cpus: int | None = Field(default=None, gt=0, description="address local: CPUs Ray may use (default: all)")
    node_ip_address: str | None = Field(
        default=None, description="address the driver's node binds; address local: loopback 127.0.0.1 unless set"
    )
    dashboard: bool = Field(default=False, description="address local: start Ray's dashboard (on 127.0.0.1:8265)")


class ServeConfig(_Section):
    """`tributary serve`: where it listens, how it batches, what a request may ask, who may ask."""

    host: str = Field(default="127.0.0.1", description="address the HTTP proxy binds (loopback unless told otherwise)")
    port: int = Field(default=8000, gt=0, lt=65536)
    replicas: int = Field(default=1, gt=0, description="service replicas, each holding the model and the store handle")
    replica_cpus: float = Field(
        default=1, gt=0, description="CPUs per replica (also its torch thread count, at least 1)"
    )
    replica_gpus: float = Field(default=0, ge=0, description="GPUs per replica (query gradients and generation)")
    max_queries_per_request: int = Field(default=32, gt=0, description="more queries in one request: 413")
    max_prompt_chars: int = Field(default=8000, gt=0, description="a longer prompt or completion: 413")
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="a prompt with more tokens: 413; default data.max_length - 1"
    )
    max_new_tokens: int = Field(default=256, gt=0, description="generate.max_new_tokens above this: 413")
    max_top_k: int = Field(default=100, gt=0, description="top_k above this: 422")
    max_request_bytes: int = Field(default=1 << 20, gt=0, description="a larger request body: 413")
    request_timeout_s: float = Field(default=60, gt=0, description="a request not answered by then: 504")
    batch_max_queries: int = Field(default=64, gt=0, description="queries scored together in one pass of the store")
    batch_wait_s: float = Field(default=0.01, ge=0, description="how long a pass waits for more requests to join it")
    max_ongoing_requests: int = Field(
        default=256,
        gt=0,
        description="requests a replica holds at once (queued for a batch or being scored); more wait at the proxy",
    )
    auth_token_env: str | None = Field(
        default=None,
        description="name of the environment variable holding the bearer token (read on the replicas' nodes)",
    )
    auth_token_file: str | None = Field(
        default=None, description="file holding the bearer token (read on the replicas' nodes)"
    )
    approximate: bool = Field(
        default=False,
        description="rank single-term methods with the ANN index beside the store (`tributary ann build STORE`), "
        "re-scoring QueryOptions.rerank candidates exactly; other methods scan exactly",
    )


class ExactConfig(_Section):
    """Exact EK-FAC/K-FAC without rows at full width: `tributary query --exact` and `--rescore K`."""

    factors: bool = Field(
        default=False, description="tributary index also fits the curvature factors at full width (for --exact)"
    )
    query_rank: int | None = Field(
        default=None,
        gt=0,
        description="--exact: keep each preconditioned query gradient's top r singular directions per module; "
        "null keeps its full rank",
    )


class JobConfig(_Section):
    model: ModelConfig
    data: DataConfig
    projection: ProjectionConfig = ProjectionConfig()
    curvature: CurvatureConfig = CurvatureConfig()
    method: MethodConfig = MethodConfig()
    store: StoreConfig
    cluster: ClusterConfig | None = Field(default=None, description="run on Ray; absent = in this process")
    placement: PlacementConfig = PlacementConfig()
    training_run: TrainingRunConfig | None = Field(
        default=None, description="checkpoints and segments of the training run; absent = the final model only"
    )
    serve: ServeConfig = ServeConfig()
    exact: ExactConfig = ExactConfig()

    def with_method(self, method: MethodConfig) -> JobConfig:
        return self.model_copy(update={"method": method})

    @property
    def weights_dtype(self) -> str:
        """The dtype the model's weights are loaded and run in: placement.dtype, else model.dtype."""
        return self.placement.dtype or self.model.dtype


# ---- what one query run or request asks, beside the job config ------------------------------------
# Declared once: `tributary query`'s options, the service's request body and the query code all read these.
# (Pydantic) dataclasses, so they validate like the config and still take positional arguments.

_OPTIONS = ConfigDict(extra="forbid")


@options_dataclass(frozen=True, config=_OPTIONS)
class GenerationSettings:
    """How the model completes each prompt before its generated tokens are attributed (`--generate`)."""

    max_new_tokens: int = Field(default=40, gt=0, description="tokens to generate")
    sample: bool = Field(default=False, description="sample (with seed) instead of greedy decoding")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus mass")
    seed: int = Field(default=0, description="sampling seed (query i uses seed + i)")
    chat: bool | None = Field(
        default=None, description="wrap the prompt in the chat template (default: when the tokenizer has one)"
    )

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@options_dataclass(frozen=True, config=_OPTIONS)
class QueryOptions:
    """What is attributed and what the results carry (the method is the config's, or the one named)."""

    k: int = Field(default=10, gt=0, description="supporting (and opposing) training examples per query")
    measurement: str = Field(
        default="logprob_sum", description="logprob_sum | logprob_mean | margin of the completion tokens"
    )
    per_module: bool = Field(default=False, description="per-module scores in the results")
    per_token: bool = Field(default=False, description="each completion token's share of each score")
    generation: GenerationSettings | None = Field(
        default=None, description="complete each prompt with the model first, then attribute the generated tokens"
    )
    approximate: bool = Field(
        default=False,
        description="rank with the ANN index beside the store (`tributary ann build STORE`); methods other than "
        "grad_dot, grad_cos, if and one-segment source scan exactly",
    )
    rerank: int = Field(
        default=100,
        ge=0,
        description="with approximate: re-score the index's top (and bottom) N candidates exactly from the stored "
        "rows; 0 keeps the index's quantised scores",
    )


def option_field(options: type, name: str) -> Any:
    """A copy of one option's field (default, bounds, description), for a schema that spells the option its
    own way: the service's `top_k` is QueryOptions.k, and the CLI's flags take their defaults and help."""
    if not is_pydantic_dataclass(options):
        raise TypeError(f"{options!r} is not an options dataclass")
    return copy.deepcopy(options.__pydantic_fields__[name])


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key; remove it or check its spelling")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def parse_config(raw: dict, source: str = "<dict>", base_dir: Path | None = None) -> JobConfig:
    """Validate a config mapping. Relative data paths are resolved against `base_dir` when given."""
    try:
        config = JobConfig.model_validate(raw)
    except ValidationError as error:
        raise TributaryError(_describe(error, source)) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    if (
        config.method.name == "source"
        and config.training_run is None
        and (config.method.eta is None or config.method.steps is None)
    ):
        raise TributaryError(
            f"invalid config {source}: method 'source' needs method.eta (mean learning rate) and "
            "method.steps (optimizer steps K), or a training_run section"
        )
    _check_serve(config, source)
    _check_placement(config, source)
    _check_fitted_projection(config, source)
    _check_budget(config, source)
    return config


def _check_budget(config: JobConfig, source: str) -> None:
    """projection.budget is built by `tributary index`'s shard workers (engine.store.budget) alone so far."""
    if config.projection.budget is None:
        return
    if config.placement.kind == "zero3" or config.training_run is not None:
        raise TributaryError(
            f"invalid config {source}: projection.budget is not supported with placement.kind zero3 or a "
            "training_run section yet; use projection.dim"
        )


def _check_fitted_projection(config: JobConfig, source: str) -> None:
    """Where the fitted projection kinds are not available yet, said before anything runs."""
    kind = config.projection.kind
    if kind not in ("kfac_eigen", "eigen_sketch") or config.projection.dim == 0:
        return
    if config.placement.kind == "zero3":
        raise TributaryError(
            f"invalid config {source}: projection.kind {kind} is not supported with placement.kind zero3 yet; use "
            "placement.kind single or device_map, or projection.kind rademacher"
        )
    if config.training_run is not None:
        raise TributaryError(
            f"invalid config {source}: projection.kind {kind} fits its matrices to one checkpoint; a training_run "
            "section needs one projection for every checkpoint: use projection.kind rademacher or gaussian"
        )


def _check_placement(config: JobConfig, source: str) -> None:
    """What the config alone decides about placement; devices and torch.distributed are checked where the
    replicas start (engine.model.placement.check_placement)."""
    placement = config.placement
    if placement.max_memory is not None and placement.kind != "device_map":
        raise TributaryError(
            f"invalid config {source}: placement.max_memory is for placement.kind device_map, not {placement.kind}; "
            "remove placement.max_memory or set placement.kind: device_map"
        )
    if placement.offload is not None and placement.kind != "device_map":
        raise TributaryError(
            f"invalid config {source}: placement.offload is for placement.kind device_map, not {placement.kind}; "
            "remove placement.offload or set placement.kind: device_map"
        )
    if placement.kind == "single" and placement.devices_per_replica != 1:
        raise TributaryError(
            f"invalid config {source}: placement.devices_per_replica is {placement.devices_per_replica} but "
            "placement.kind single holds the model on one device; set placement.kind device_map or zero3"
        )
    if placement.kind == "zero3" and config.cluster is None:
        raise TributaryError(
            f"invalid config {source}: placement.kind zero3 runs its ranks as Ray actors; add a cluster section "
            "(cluster: {address: local} runs them on this machine)"
        )
    if placement.kind == "zero3" and config.model.adapter is not None and config.model.adapter_mode != "adapter":
        raise TributaryError(
            f"invalid config {source}: model.adapter_mode {config.model.adapter_mode} is not supported with "
            "placement.kind zero3 (the adapter would be merged into or removed from partitioned weights); use "
            "adapter_mode: adapter, or placement.kind single or device_map"
        )
    if placement.kind == "zero3" and config.data.on_nonfinite == "skip":
        raise TributaryError(
            f"invalid config {source}: data.on_nonfinite skip is not supported with placement.kind zero3 (a rank "
            "re-running a shard without its skipped rows would leave the group's collectives out of step); use "
            "data.on_nonfinite: error, or placement.kind single or device_map"
        )
    if placement.kind == "zero3" and config.training_run is not None:
        raise TributaryError(
            f"invalid config {source}: placement.kind zero3 is not supported with a training_run section yet; "
            "use placement.kind single or device_map for training runs"
        )


def _check_serve(config: JobConfig, source: str) -> None:
    serve = config.serve
    if serve.auth_token_env is not None and serve.auth_token_file is not None:
        raise TributaryError(f"invalid config {source}: give serve.auth_token_env or serve.auth_token_file, not both")
    if serve.batch_max_queries < serve.max_queries_per_request:
        raise TributaryError(
            f"invalid config {source}: serve.batch_max_queries ({serve.batch_max_queries}) is smaller than "
            f"serve.max_queries_per_request ({serve.max_queries_per_request}); a full request must fit in one batch"
        )
    if serve.max_prompt_tokens is not None and serve.max_prompt_tokens >= config.data.max_length:
        raise TributaryError(
            f"invalid config {source}: serve.max_prompt_tokens ({serve.max_prompt_tokens}) must be below "
            f"data.max_length ({config.data.max_length}) so a completion token fits"
        )


def with_method_name(config: JobConfig, name: str, source: str) -> JobConfig:
    """The config with `method.name` replaced, validated as a whole (e.g. source needs eta and steps)."""
    raw = config.model_dump()
    raw["method"] = dict(raw["method"], name=name)
    return parse_config(raw, source=source)


def _resolve(path: str, base_dir: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())


def _resolve_paths(config: JobConfig, base_dir: Path) -> JobConfig:
    data = config.data.model_copy(update={"train": _resolve(config.data.train, base_dir)})
    store = config.store.model_copy(update={"path": _resolve(config.store.path, base_dir)})
    model_path = config.model.path
    if (base_dir / model_path).exists():
        model_path = _resolve(model_path, base_dir)
    adapter = config.model.adapter
    if adapter is not None and (base_dir / adapter).exists():
        adapter = _resolve(adapter, base_dir)
    placement = config.placement
    offload = placement.offload
    if offload is not None and offload != "cpu":
        placement = placement.model_copy(update={"offload": _resolve(offload, base_dir)})
    tokenizer = config.model.tokenizer
    if tokenizer is not None and (base_dir / tokenizer).exists():
        tokenizer = _resolve(tokenizer, base_dir)
    model = config.model.model_copy(update={"path": model_path, "adapter": adapter, "tokenizer": tokenizer})
    token_file = config.serve.auth_token_file
    serve = config.serve.model_copy(
        update={"auth_token_file": None if token_file is None else _resolve(token_file, base_dir)}
    )
    budget = config.projection.budget
    if budget is not None:
        budget = budget.model_copy(update={"measured_on": _resolve(budget.measured_on, base_dir)})
    return config.model_copy(
        update={
            "projection": config.projection.model_copy(update={"budget": budget}),
            "data": data,
            "store": store,
            "model": model,
            "serve": serve,
            "placement": placement,
            "training_run": _resolve_run_paths(config.training_run, base_dir),
        }
    )


def _resolve_run_paths(run: TrainingRunConfig | None, base_dir: Path) -> TrainingRunConfig | None:
    if run is None:
        return None
    checkpoints = [
        _resolve(c, base_dir) if isinstance(c, str) else c.model_copy(update={"path": _resolve(c.path, base_dir)})
        for c in run.checkpoints
    ]
    segments = run.segments
    if isinstance(segments, list):
        segments = [
            s.model_copy(
                update={
                    "checkpoints": [_resolve(c, base_dir) if isinstance(c, str) else c for c in s.checkpoints],
                    "data": None if s.data is None else _resolve(s.data, base_dir),
                }
            )
            for s in segments
        ]
    trainer_dir = None if run.trainer_dir is None else _resolve(run.trainer_dir, base_dir)
    return run.model_copy(update={"checkpoints": checkpoints, "segments": segments, "trainer_dir": trainer_dir})


def load_config(path: str | Path) -> JobConfig:
    """Read and validate a YAML job config; relative paths in it are relative to the current directory."""
    path = Path(path)
    if not path.is_file():
        raise TributaryError(f"config file {path} does not exist; pass the path of a YAML job config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TributaryError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise TributaryError(f"config file {path} must hold a mapping with model, data and store sections")
    return parse_config(raw, source=str(path), base_dir=Path.cwd())
