"""The job configuration: a YAML file validated by pydantic; an unknown key is an error that names it.

One module per section (model, data, projection, curvature, method, training_run, store, placement, cluster,
serve, exact), `job` for the whole config, `query_options` for what a query run or request asks beside it,
`validation` for the rules that span sections and `loading` for reading YAML. Import from here.
"""

from engine.config.cluster import ClusterConfig
from engine.config.commands import COMMAND_ARGS, EVAL_TASKS, CommandArgs, flags_of, is_argument
from engine.config.curvature import CurvatureConfig
from engine.config.data import DataConfig
from engine.config.exact import ExactConfig
from engine.config.job import JobConfig
from engine.config.json_types import json_types_as_declared
from engine.config.loading import load_config, parse_config, with_method_name
from engine.config.method import METHODS, MethodConfig, MethodSpec, method_names, unknown_method
from engine.config.model import ModelConfig
from engine.config.placement import PlacementConfig
from engine.config.projection import ProjectionBudget, ProjectionConfig
from engine.config.query_options import MEASUREMENTS, GenerationSettings, QueryOptions, option_field
from engine.config.serve import ServeConfig
from engine.config.store import StoreConfig
from engine.config.training_run import CheckpointConfig, OptimizerConfig, SegmentConfig, TrainingRunConfig

__all__ = [
    "COMMAND_ARGS",
    "EVAL_TASKS",
    "MEASUREMENTS",
    "CommandArgs",
    "flags_of",
    "is_argument",
    "METHODS",
    "CheckpointConfig",
    "ClusterConfig",
    "CurvatureConfig",
    "DataConfig",
    "ExactConfig",
    "GenerationSettings",
    "JobConfig",
    "MethodConfig",
    "MethodSpec",
    "ModelConfig",
    "OptimizerConfig",
    "PlacementConfig",
    "ProjectionBudget",
    "ProjectionConfig",
    "QueryOptions",
    "SegmentConfig",
    "ServeConfig",
    "StoreConfig",
    "TrainingRunConfig",
    "json_types_as_declared",
    "load_config",
    "method_names",
    "option_field",
    "parse_config",
    "unknown_method",
    "with_method_name",
]
