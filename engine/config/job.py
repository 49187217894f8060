"""The whole job config: one field per section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from engine.config.cluster import ClusterConfig
from engine.config.curvature import CurvatureConfig
from engine.config.data import DataConfig
from engine.config.exact import ExactConfig
from engine.config.method import MethodConfig
from engine.config.model import ModelConfig
from engine.config.placement import PlacementConfig
from engine.config.projection import ProjectionConfig
from engine.config.section import Section as _Section
from engine.config.serve import ServeConfig
from engine.config.store import StoreConfig
from engine.config.training_run import TrainingRunConfig
from engine.config.validation import check_rules, describe_errors
from engine.errors import TributaryError


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

    @classmethod
    def validated(cls, raw: dict, source: str = "<dict>", *, part_of_run: bool = False) -> JobConfig:
        """`raw` validated section by section, then by the rules that span sections (engine.config.validation);
        a TributaryError naming `source` and what to fix."""
        try:
            config = cls.model_validate(raw)
        except ValidationError as error:
            raise TributaryError(describe_errors(error, source)) from None
        check_rules(config, source, part_of_run=part_of_run)
        return config

    def derive(self, *, source: str = "(derived)", part_of_run: bool = False, **changes: Any) -> JobConfig:
        """A copy with `changes` applied and validated again as a whole, the only way a config is derived.

        Each change names a section: a mapping updates those keys of it (`store={"path": p}`), a section or
        None replaces it. `part_of_run`: one checkpoint's config of a training run (see check_rules)."""
        # exclude_unset: a field the config never set stays unset, so rules on what was given (projection.budget
        # replaces dim) read the derived config as they read the parsed one
        raw = self.model_dump(exclude_unset=True)
        for name, value in changes.items():
            if name not in type(self).model_fields:
                raise ValueError(f"JobConfig has no section {name!r}")
            if isinstance(value, BaseModel):
                raw[name] = value.model_dump(exclude_unset=True)
            elif isinstance(value, dict) and getattr(self, name) is not None:
                raw[name] = {**raw.get(name, {}), **value}
            else:
                raw[name] = value
        return type(self).validated(raw, source, part_of_run=part_of_run)

    def with_method(self, method: MethodConfig) -> JobConfig:
        return self.derive(method=method)

    @property
    def weights_dtype(self) -> str:
        """The dtype the model's weights are loaded and run in: placement.dtype, else model.dtype."""
        return self.placement.dtype or self.model.dtype
