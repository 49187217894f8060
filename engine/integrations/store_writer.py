"""Write captured segments into a training-run store, the kind `tributary index` builds from `training_run`.

Each segment ℓ is one checkpoint c<ℓ> of the plan: the weights after its last step (saved beside the store,
in <store>.weights/c<ℓ>, where a method needs them), its rows (engine.integrations.segments), and its own
factors: the covariance sums of its steps eigendecomposed, Λ from its rows (EK-FAC; the true Fisher: from its
sampled-label rows, as the index reads Λ from fisher_grads).
A segment is written whole, then recorded in the root manifest's plan and `segments_done`; the root is
`complete` only when training ends. A crash leaves an incomplete store, never a half-written segment that a
query could read (a query refuses an incomplete store).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from engine.config import JobConfig
from engine.curvature.accumulators import LambdaAccumulator
from engine.curvature.factors import NEEDS_LAMBDA_PASS
from engine.curvature.fitting import corrected_factors, module_widths, shared_basis
from engine.data.rows import dataset_fingerprint
from engine.errors import TributaryError
from engine.gradients.context import load_model_context
from engine.indexing.manifest import build_manifest
from engine.integrations.partitioned import loading_whole
from engine.integrations.segments import SegmentRows
from engine.model.fingerprint import model_fingerprint
from engine.model.loading import loaded_model_config
from engine.projection import ProjectionSpec
from engine.store import GradientStore, location
from engine.store.manifest import RunManifest, RunStoreSettings, ShardCommit, StoreManifest
from engine.store.nodes import read
from engine.store.run_store import RunStore
from engine.store.zarr_store import default_rows_per_chunk
from engine.training_run.configs import checkpoint_config
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan
from engine.training_run.preconditioner import square_root

LAMBDA_BLOCK = 256  # rows rotated at a time for Λ


def weights_root(config: JobConfig) -> Path:
    local = location.local_path(config.store.path)
    if local is None:
        raise TributaryError(
            "capture saves the segment boundaries' weights next to the store, so store.path must be local; "
            "use a local store.path"
        )
    return Path(local + ".weights")


class RunWriter:
    def __init__(
        self,
        config: JobConfig,
        spec: ProjectionSpec,
        ids: list[str],
        fingerprints: dict[str, str],
        optimizer: str,
        momentum: float,
        keep_all_weights: bool,
        preconditioned: bool = False,
        resume_segments: int | None = None,
    ):
        """`resume_segments`: continue the store already at config.store.path, keeping its first that many
        segments (those a resumed training run finished before the state it resumes from); None: a new store."""
        self.config = config
        self.spec = spec
        self.ids = ids
        self.fingerprints = fingerprints  # the tokenizer's (the model's is taken at each boundary)
        self.scale = 1.0 / (1.0 - momentum) if optimizer == "sgd" else 1.0  # SGD momentum β: η/(1−β)
        self.optimizer = optimizer
        self.keep_all_weights = keep_all_weights
        self.preconditioned = preconditioned
        self.checkpoints: list[CheckpointPlan] = []
        self.segments: list[SegmentPlan] = []
        self.started = time.perf_counter()
        self.dataset_fingerprint = dataset_fingerprint(config.data.train)
        if resume_segments is None:
            self.root = RunStore.create(config.store.path, self._manifest())
        else:
            self._resume(resume_segments)

    def _resume(self, kept: int) -> None:
        self.root = RunStore.open(self.config.store.path, mode="r+")
        if self.root.manifest.projection.fingerprint() != self.spec.fingerprint():
            raise TributaryError(
                f"the store at {location.redact(self.config.store.path)} was captured with another projection or "
                "other tracked modules; resume with the config of the interrupted run"
            )
        plan = self.root.plan
        if len(plan.segments) < kept:
            raise TributaryError(
                f"the store at {location.redact(self.config.store.path)} holds {len(plan.segments)} finished "
                f"segments, but the capture state to resume from follows {kept}; resume from a later checkpoint"
            )
        self.checkpoints, self.segments = list(plan.checkpoints[:kept]), list(plan.segments[:kept])
        self.root.update_manifest(plan=self._plan(), segments_done=list(range(kept)), complete=False)

    def _plan(self) -> RunPlan:
        return RunPlan(
            tuple(self.checkpoints),
            tuple(self.segments),
            (self.config.data.train,),
            self.optimizer,
            self.preconditioned,
        )

    def _manifest(self) -> RunManifest:
        return RunManifest(
            plan=self._plan(),
            projection=self.spec,
            curvature=self.config.curvature.model_dump(exclude={"lambdas"}),
            store=RunStoreSettings(dtype=self.config.store.dtype, rows_per_chunk=self.config.store.rows_per_chunk),
        )

    def write_segment(
        self,
        segment: SegmentRows,
        model: nn.Module,
        modules: dict[str, nn.Module],
        final: bool,
        preconditioner: dict[str, np.ndarray] | None = None,
    ) -> None:
        """`modules`: the tracked modules of `model`, whose weights at the segment's end are fingerprinted.
        `preconditioner`: Adam's P at the segment's end (a preconditioned run): kept as the segment's P̄, and
        the segment's own factors are then those of P̄^{1/2} H P̄^{1/2}, as `tributary index` fits them."""
        key = ResourceKey.checkpoint(segment.index).group_name
        weights = self._save_weights(model, key) if final or self.keep_all_weights else None
        eta = segment.mean_rate * self.scale
        sub = self._checkpoint_config(key, weights)
        fingerprint = model_fingerprint(model, modules) if weights is None else self._saved(sub, model, modules)
        store = self._write_rows(segment, sub, key, fingerprint)
        store.write_factors(self._factors(segment))
        if preconditioner is not None:
            store.write_module_arrays("preconditioner", preconditioner)
            self.root.write_segment_preconditioner(segment.index, preconditioner)
            self.root.write_segment_factors(segment.index, self._factors(segment, square_root(preconditioner)))
        store.update_manifest(
            stages={"eigen": True, "final": True},
            complete=True,
            timings={"total_s": round(time.perf_counter() - self.started, 4)},
        )
        self.checkpoints.append(CheckpointPlan(key, segment.index, weights, eta, segment.last_step))
        self.segments.append(SegmentPlan(segment.index, (key,), eta, segment.steps, 0))
        self.root.update_manifest(plan=self._plan(), segments_done=[*self.root.manifest.segments_done, segment.index])

    def _save_weights(self, model: nn.Module, key: str) -> str:
        target = weights_root(self.config) / key
        save = getattr(model, "save_pretrained", None)
        if not callable(save):
            raise TributaryError(
                f"capture saves the weights of segment boundaries with save_pretrained; {type(model).__name__} has "
                "none: train an HF transformers or peft model"
            )
        save(target)  # a peft model saves its adapter
        return str(target.resolve())

    def keep_final_weights(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        """Save the last segment's weights after all (training ended at its boundary)."""
        last = self.checkpoints[-1]
        weights = self._save_weights(model, last.name)
        store = self.root.checkpoint(last.name, mode="r+")
        recorded = store.manifest.fingerprints
        saved = self._saved(self._checkpoint_config(last.name, weights), model, modules)
        fingerprints = type(recorded).model_validate({**recorded.model_dump(), "model": saved})
        store.update_manifest(fingerprints=fingerprints)
        self.checkpoints[-1] = replace(last, path=weights)
        self.root.update_manifest(plan=self._plan())

    def _checkpoint_config(self, key: str, weights: str | None) -> JobConfig:
        path = self.root.checkpoint_path(key)
        return checkpoint_config(self.config, weights or self.config.model.path, self.config.data.train, path)

    def _saved(self, sub: JobConfig, model: nn.Module, modules: dict[str, nn.Module]) -> str:
        """The fingerprint a query will see of the weights just saved for `sub`: the live tracked weights (the
        bytes saved) with the config the saved model loads back with (the Trainer changes the in-memory config,
        e.g. use_cache, which a saved adapter does not carry), so nothing is read back from disk."""
        with loading_whole():
            if sub.model.adapter is not None and sub.model.adapter_mode != "adapter":  # other modules: load it
                return load_model_context(sub, spec=self.spec, device=torch.device("cpu")).fingerprints["model"]
            return model_fingerprint(model, modules, loaded_model_config(sub.model, sub.placement))

    def complete(self) -> RunStore:
        if not self.segments:
            raise TributaryError("capture recorded no training step; nothing was written to the store")
        self.root.update_manifest(complete=True, timings={"total_s": round(time.perf_counter() - self.started, 4)})
        return self.root

    # ---- one segment's sub-store ---------------------------------------------------------------------
    def _write_rows(self, segment: SegmentRows, sub: JobConfig, key: str, model_fingerprint: str) -> GradientStore:
        rows = len(self.ids)
        fingerprints = dict(self.fingerprints, model=model_fingerprint)
        manifest = StoreManifest.model_validate(
            dict(
                build_manifest(sub, self.spec, fingerprints, self.dataset_fingerprint),
                rows=rows,
                width=self.spec.total_width,
                dtype=self.config.store.dtype,
                rows_per_chunk=self.config.store.rows_per_chunk
                or default_rows_per_chunk(self.spec.total_width, self.config.store.dtype, rows),
            )
        )
        store = GradientStore.create(self.root.checkpoint_path(key), manifest)
        grads, losses = segment.grads(), segment.losses()
        commits = {}
        for shard, (start, stop) in enumerate(store.shards()):
            clock = time.perf_counter()
            digest, arrays = store.write_rows(
                start, grads[start:stop], self.ids[start:stop], segment.num_tokens[start:stop], losses[start:stop]
            )
            commits[shard] = ShardCommit(
                checksum=digest,
                arrays=arrays,
                node=socket.gethostname(),
                pid=os.getpid(),
                seconds=round(time.perf_counter() - clock, 4),
            )
        meta = store.group.require_group("rows")
        for name, values in zip(CAPTURED_ROW_ARRAYS, (segment.step, segment.epoch, segment.seen)):
            meta.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True)[...] = values
        store.update_manifest(shards={"gradients": commits}, completed_shards=sorted(commits))
        return store

    def _factors(self, segment: SegmentRows, scale: dict[str, np.ndarray] | None = None):
        strategy = self.config.curvature.strategy
        basis = shared_basis(strategy, module_widths(self.spec), [segment.covariance.sums])
        if strategy not in NEEDS_LAMBDA_PASS:
            return basis
        lambdas = LambdaAccumulator(self.spec, basis, scale)
        seen = np.flatnonzero(segment.seen)
        grads = segment.lambda_grads()
        for start in range(0, len(seen), LAMBDA_BLOCK):
            block = torch.from_numpy(np.ascontiguousarray(grads[seen[start : start + LAMBDA_BLOCK]])).double()
            lambdas.add(
                {
                    m.name: block[:, m.offset : m.offset + m.width].reshape(-1, m.k_out, m.k_in)
                    for m in self.spec.modules
                }
            )
        return corrected_factors(strategy, basis, [lambdas.sums])


CAPTURED_ROW_ARRAYS = ("step", "epoch", "seen")


def captured_rows(store: GradientStore) -> dict[str, np.ndarray]:
    """A captured segment's per-row step, epoch and occurrence count (rows/step, rows/epoch, rows/seen)."""
    return {name: read(store.group, f"rows/{name}", slice(None)) for name in CAPTURED_ROW_ARRAYS}


class OtherRankWriter(RunWriter):
    """A rank other than 0 of a distributed run: it takes part in each segment's reduction, writes nothing."""

    def __init__(self, config: JobConfig, spec: ProjectionSpec, *args, resume_segments: int | None = None, **kwargs):
        self.config, self.spec = config, spec
        self.checkpoints = []
        self.keep_all_weights = bool(kwargs.get("keep_all_weights", False))
        # a resumed run's finished segments (rank 0 keeps their plan; here only their count numbers the next)
        self.segments = [SegmentPlan(index, (), None, 0) for index in range(resume_segments or 0)]
        self.root = cast(RunStore, None)  # never read: close() returns complete()'s None on these ranks

    def write_segment(self, segment: SegmentRows, *args, **kwargs) -> None:
        self.segments.append(SegmentPlan(segment.index, (), None, segment.steps))

    def keep_final_weights(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        return None

    def complete(self) -> RunStore | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        return None


def resume_root(config: JobConfig) -> Path:
    """The folder of the capture states kept for a resumed run (beside the store)."""
    local = location.local_path(config.store.path)
    if local is None:
        raise TributaryError("capture keeps its resume state next to the store, so store.path must be local")
    return Path(local + ".resume")


def state_path(config: JobConfig, step: int, rank: int = 0) -> Path:
    """Where rank `rank`'s capture state after optimizer step `step` is kept (a distributed run's ranks each
    keep their own: each holds the rows of its own micro-batches until the segment ends)."""
    root = resume_root(config)
    return (root if rank == 0 else root / f"rank-{rank}") / f"step-{step}.npz"
