"""A loaded model with what gradients need (tracked modules, projection, capture), for an index or a query."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from engine.capture.capture import GradientCapture
from engine.capture.coverage import Coverage, check_coverage, model_coverage
from engine.capture.modules import select_modules, tracked_shapes
from engine.config import JobConfig
from engine.data.rows import Row, dataset_fingerprint, field_names, read_rows
from engine.data.tokenize import TokenizedRow, tokenize_rows
from engine.errors import TributaryError
from engine.model.fingerprint import model_fingerprint, tokenizer_fingerprint
from engine.model.loading import compute_dtype_for, load_model
from engine.model.placement import execution_device, input_device
from engine.projection import ProjectionSpec, build_projection

RemoteGradients = Callable[[list[TokenizedRow], str], np.ndarray]  # (rows, measurement) -> projected gradients


@dataclass
class ModelContext:
    """A loaded model with its tracked modules, projection and capture."""

    config: JobConfig
    model: nn.Module
    tokenizer: object
    modules: dict[str, nn.Module]
    spec: ProjectionSpec
    capture: GradientCapture
    device: torch.device
    pad_id: int
    # set when the model lives elsewhere (a zero3 group): its query gradients and fingerprints come from there
    remote_gradients: RemoteGradients | None = None
    remote_fingerprints: dict[str, str] | None = None
    coverage: Coverage | None = None  # what the tracked modules cover (None for a model held elsewhere)

    @property
    def fingerprints(self) -> dict[str, str]:
        if self.remote_fingerprints is not None:
            return self.remote_fingerprints
        return {
            "model": model_fingerprint(self.model, self.modules),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }

    def tokenize(self, rows: list[Row], source: str) -> list[TokenizedRow]:
        return tokenize_rows(rows, self.tokenizer, self.config.data.max_length, source, vocab_size=self.vocab_size)

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary (its input embeddings' rows), that pre-tokenized rows are checked against."""
        embeddings = getattr(self.model, "get_input_embeddings", None)
        table = embeddings() if embeddings is not None else None
        return table.num_embeddings if isinstance(table, nn.Embedding) else None


def configured_projection(config: JobConfig, shapes: list[tuple[str, int, int]]) -> ProjectionSpec:
    """The config's projection of the tracked modules' (name, d_in, d_out) shapes: what a loaded model's context
    uses and what `tributary plan` / the index plan resolve from the weightless (meta-device) model."""
    projection = config.projection
    return build_projection(
        projection.dim, projection.seed, projection.kind, shapes, projection.fit_rows, projection.top, projection.fit
    )


def structure_shapes(config: JobConfig, model: nn.Module) -> list[tuple[str, int, int]]:
    """The tracked modules' shapes of `model` (weights loaded or on the meta device), as the config picks them."""
    return tracked_shapes(select_modules(model, config.model.modules), config.model.include_bias)


def load_model_context(
    config: JobConfig, spec: ProjectionSpec | None = None, device: torch.device | None = None
) -> ModelContext:
    """Load the model and build (or reuse, for queries against a store) the projection spec."""
    model, tokenizer = load_model(config.model, device, config.placement)
    return context_for_model(config, model, tokenizer, input_device(model), spec)


def context_for_model(
    config: JobConfig, model: nn.Module, tokenizer, device: torch.device, spec: ProjectionSpec | None = None
) -> ModelContext:
    """The context of a model already loaded (ZeRO-3 loads its own: engine.model.zero3)."""
    modules = select_modules(model, config.model.modules)
    shapes = tracked_shapes(modules, config.model.include_bias)
    if spec is None:
        spec = configured_projection(config, shapes)
    elif [(m.name, m.d_in, m.d_out) for m in spec.modules] != shapes:
        raise TributaryError(
            "the tracked modules of model.path (with model.modules / include_bias) differ from those the "
            "store was built with; use the same model and module patterns as the index"
        )
    coverage = model_coverage(model, modules, config.model.include_bias, spec.total_width, config.store.dtype)
    check_coverage(coverage, config.model.min_coverage, chosen_by_hand=config.model.modules is not None)
    compute_dtype = compute_dtype_for(next(model.parameters()).dtype)
    devices = {name: execution_device(module, device) for name, module in modules.items()}
    capture = GradientCapture(model, modules, spec, config.model.include_bias, compute_dtype, device, devices)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pad_id = cast(int, pad_id)  # transformers types every special-token id as int | list[int] | str | list[str]
    capture.check_routed_forward(len(tokenizer))
    return ModelContext(config, model, tokenizer, modules, spec, capture, device, pad_id, coverage=coverage)


def with_projection(context: ModelContext, spec: ProjectionSpec) -> ModelContext:
    """The same loaded model with another projection (the fitted matrices, or the fitting pass's full width)."""
    if context.remote_gradients is not None:
        raise TributaryError("a model held by a zero3 group cannot change its projection here")
    return context_for_model(context.config, context.model, context.tokenizer, context.device, spec)


def with_stored_projection(context: ModelContext, read: Callable[[], dict]) -> ModelContext:
    """`context` with its fitted projection's matrices (from `read`, the store's) where its kind has them."""
    if not context.spec.fitted or context.spec.matrices is not None:
        return context
    return with_projection(context, context.spec.with_matrices(read()))


@dataclass
class IndexJob:
    context: ModelContext
    rows: list[Row]
    tokenized: list[TokenizedRow]
    dataset_fingerprint: str

    @property
    def config(self) -> JobConfig:
        return self.context.config


def prepare_index_job(config: JobConfig, device: torch.device | None = None) -> IndexJob:
    context = load_model_context(config, device=device)
    rows = read_rows(config.data.train, field_names(config), what="data.train")
    tokenized = context.tokenize(rows, config.data.train)
    return IndexJob(context, rows, tokenized, dataset_fingerprint(config.data.train))


def remote_model_context(
    config: JobConfig,
    tokenizer,
    spec: ProjectionSpec,
    fingerprints: dict[str, str],
    gradients: RemoteGradients,
) -> ModelContext:
    """The context of a model held elsewhere (the ranks of a zero3 group): the tokenizer, projection and
    fingerprints here, the query gradients from `gradients`. Nothing in this process can run the model, so
    generation and per-token gradients refuse it (engine.config.capabilities)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    no_capture = cast(GradientCapture, None)  # never used: every gradient comes from `gradients`
    return ModelContext(
        config,
        nn.Module(),
        tokenizer,
        {},
        spec,
        no_capture,
        torch.device("cpu"),
        cast(int, pad_id),
        gradients,
        fingerprints,
    )
