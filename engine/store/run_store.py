"""A store for a whole training run: one Zarr group holding one gradient store per checkpoint.

Layout:
  attrs["manifest"]            format tributary-run/1, the resolved run plan, the projection spec (shared
                               by every checkpoint), settings, `segments_done`, `complete`
                               (engine.store.manifest.RunManifest)
  checkpoints/<c0|c1|..>       a complete single-checkpoint store each (tributary-store/1: grads, rows,
                               factors, its own manifest with that checkpoint's fingerprints); avg<l> for a
                               segment's averaged parameters (Fast-Source)
  segments/s<l>/factors        Source's factors of segment l: covariances averaged over its checkpoints, one
                               eigenbasis, Λ corrected at every checkpoint and averaged (of P̄^{1/2} H P̄^{1/2}
                               for a preconditioned run); absent when the segment is one plain checkpoint
  segments/s<l>/preconditioner P̄ of segment l (Adam), per module in the stored layout

A store written before training runs existed is a plain tributary-store/1 group: one checkpoint, one segment.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.core.common import AccessModeLiteral

from engine.config import JobConfig
from engine.config.capabilities import StoreKind
from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.projection import ModuleProjection
from engine.store.location import redact
from engine.store.manifest import (
    RUN_FORMAT,
    ManifestStore,
    RunManifest,
    open_group,
    parse_manifest,
    raw_manifest,
    stored_kind,
)
from engine.store.nodes import subgroup
from engine.store.zarr_store import (
    GradientStore,
    check_factors,
    check_module_arrays,
    read_factor_group,
    read_module_arrays,
    write_factor_group,
    write_module_arrays,
)
from engine.training_run.configs import checkpoint_config
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import RunPlan
from engine.training_run.resolve import require_schedule


def is_run_store(path: str) -> bool:
    return stored_kind(path) is RunManifest


class RunStore(ManifestStore[RunManifest]):
    @classmethod
    def create(cls, path: str, manifest: RunManifest) -> RunStore:
        group = cls._create_group(path, manifest)
        group.require_group("checkpoints")
        group.require_group("segments")
        return cls(group, path, manifest)

    @classmethod
    def open(cls, path: str, mode: AccessModeLiteral = "r") -> RunStore:
        if not is_run_store(path):
            raise TributaryError(f"{redact(path)} is not a Tributary training-run store ({RUN_FORMAT})")
        group = open_group(path, mode)
        if group is None:  # removed since is_run_store looked
            raise TributaryError(f"store {redact(path)} does not exist; run `tributary index` first")
        return cls(group, path, parse_manifest(raw_manifest(group) or {}, RunManifest, path))

    @property
    def plan(self) -> RunPlan:
        return self.manifest.plan

    @property
    def kind(self) -> StoreKind:
        return "averaged_run" if self.plan.averaged else "training_run"

    # ---- the interface it shares with GradientStore (a single-checkpoint store: a run of one) --------------
    def run_plan(self, config: JobConfig) -> RunPlan:
        return self.plan

    def final_config(self, config: JobConfig) -> JobConfig:
        """The run's config at its final checkpoint: that checkpoint's weights, segment data and sub-store."""
        final = self.plan.final
        dataset = self.plan.datasets[self.plan.segments[final.segment].dataset]
        return checkpoint_config(config, final.weights, dataset, self.checkpoint_path(final.name))

    def final_store(self) -> GradientStore:
        return self.checkpoint(self.plan.final.name)

    def checkpoint_store(self, name: str, mode: AccessModeLiteral = "r") -> GradientStore:
        return self.checkpoint(name, mode)

    def check_schedule(self, method: str) -> None:
        """The learning rates and steps `method` needs, from the run (a TributaryError naming what to set)."""
        require_schedule(self.plan, method)

    def size_text(self) -> str:
        return "training-run store"

    @property
    def modules(self) -> tuple[ModuleProjection, ...]:
        return self.manifest.projection.modules

    @staticmethod
    def checkpoint_path_for(path: str, key: str) -> str:
        return f"{path.rstrip('/')}/checkpoints/{key}"

    def checkpoint_path(self, key: str) -> str:
        return self.checkpoint_path_for(self.path, key)

    def checkpoint(self, key: str, mode: AccessModeLiteral = "r") -> GradientStore:
        return GradientStore.open(self.checkpoint_path(key), mode=mode)

    def has_checkpoint(self, key: str) -> bool:
        return GradientStore.exists(self.checkpoint_path(key))

    # ---- per-segment factors ------------------------------------------------------------------------
    @staticmethod
    def _segment_path(index: int) -> str:
        return f"segments/{ResourceKey.segment(index).group_name}"

    def _segment(self, index: int) -> zarr.Group:
        return self.group.require_group(self._segment_path(index))

    def write_segment_factors(self, index: int, factors: dict[str, ModuleFactors]) -> None:
        group = f"{self._segment_path(index)}/factors"
        digests = write_factor_group(self._segment(index).require_group("factors"), factors, self.modules)
        self.record_checksums(group, {f"{group}/{field}": values for field, values in digests.items()})

    def has_segment_factors(self, index: int) -> bool:
        return f"{self._segment_path(index)}/factors" in self.group

    def read_segment_factors(self, index: int) -> dict[str, ModuleFactors]:
        """The segment's factors as written, checked against the per-module checksums recorded then."""
        name = f"{self._segment_path(index)}/factors"
        factors = read_factor_group(subgroup(self.group, name), self.modules)
        check_factors(factors, self.modules, self.manifest.array_checksums, name, self.path)
        return factors

    def write_segment_preconditioner(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        path = f"{self._segment_path(index)}/preconditioner"
        digests = write_module_arrays(self._segment(index), "preconditioner", arrays, self.modules)
        self.record_checksums(path, {path: digests})

    def read_segment_preconditioner(self, index: int) -> dict[str, np.ndarray]:
        path = f"{self._segment_path(index)}/preconditioner"
        arrays = read_module_arrays(subgroup(self.group, self._segment_path(index)), "preconditioner", self.modules)
        check_module_arrays(arrays, self.manifest.array_checksums.get(path, {}), path, self.path)
        return arrays
