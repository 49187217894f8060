"""Reading a job config: YAML or a mapping, validated, its relative paths resolved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.config.job import JobConfig
from engine.config.training_run import TrainingRunConfig
from engine.errors import TributaryError, shown_name


def parse_config(raw: dict, source: str = "<dict>", base_dir: Path | None = None) -> JobConfig:
    """Validate a config mapping. Relative data paths are resolved against `base_dir` when given."""
    config = JobConfig.validated(raw, source)
    if base_dir is not None:
        config = config.derive(source=source, **_resolved_paths(config, base_dir))
    return config


def with_method_name(config: JobConfig, name: str, source: str) -> JobConfig:
    """The config with `method.name` replaced, validated as a whole (e.g. source needs eta and steps)."""
    return config.derive(source=source, method={"name": name})


def _resolve(path: str, base_dir: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())


def _resolved_paths(config: JobConfig, base_dir: Path) -> dict[str, Any]:
    """The changes (for JobConfig.derive) that make the config's relative paths absolute under base_dir."""
    model_path = config.model.path
    if (base_dir / model_path).exists():
        model_path = _resolve(model_path, base_dir)
    adapter = config.model.adapter
    if adapter is not None and (base_dir / adapter).exists():
        adapter = _resolve(adapter, base_dir)
    tokenizer = config.model.tokenizer
    if tokenizer is not None and (base_dir / tokenizer).exists():
        tokenizer = _resolve(tokenizer, base_dir)
    token_file = config.serve.auth_token_file
    changes: dict[str, Any] = {
        "data": {"train": _resolve(config.data.train, base_dir)},
        "store": {"path": _resolve(config.store.path, base_dir)},
        "model": {"path": model_path, "adapter": adapter, "tokenizer": tokenizer},
        "serve": {"auth_token_file": None if token_file is None else _resolve(token_file, base_dir)},
        "training_run": _resolved_run_paths(config.training_run, base_dir),
    }
    budget = config.projection.budget
    if budget is not None and budget.measured_on is not None:
        changes["projection"] = {
            "budget": {**budget.model_dump(), "measured_on": _resolve(budget.measured_on, base_dir)}
        }
    offload = config.placement.offload
    if offload is not None and offload != "cpu":
        changes["placement"] = {"offload": _resolve(offload, base_dir)}
    return changes


def _resolved_run_paths(run: TrainingRunConfig | None, base_dir: Path) -> dict[str, Any] | None:
    if run is None:
        return None
    raw = run.model_dump()
    raw["checkpoints"] = [
        _resolve(c, base_dir) if isinstance(c, str) else dict(c, path=_resolve(c["path"], base_dir))
        for c in raw["checkpoints"]
    ]
    if isinstance(raw["segments"], list):
        raw["segments"] = [
            dict(
                s,
                checkpoints=[_resolve(c, base_dir) if isinstance(c, str) else c for c in s["checkpoints"]],
                data=None if s["data"] is None else _resolve(s["data"], base_dir),
            )
            for s in raw["segments"]
        ]
    raw["trainer_dir"] = None if run.trainer_dir is None else _resolve(run.trainer_dir, base_dir)
    return raw


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """One line with file:line:column (as compilers say it), for PyYAML's multi-line excerpt."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or type(error).__name__
    return f"config file {path} is not valid YAML: {where}: {shown_name(' '.join(str(problem).split()))}; fix it there"


def load_config(path: str | Path) -> JobConfig:
    """Read and validate a YAML job config; relative paths in it are relative to the current directory."""
    path = Path(path)
    if not path.is_file():
        raise TributaryError(f"config file {path} does not exist; pass the path of a YAML job config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TributaryError(_yaml_problem(path, error)) from None
    if not isinstance(raw, dict):
        raise TributaryError(f"config file {path} must hold a mapping with model, data and store sections")
    return parse_config(raw, source=str(path), base_dir=Path.cwd())
