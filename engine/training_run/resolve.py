"""Resolve the config's `training_run` into a `RunPlan`: which checkpoints, in which segments, with which
step counts and learning rates. Every check runs here, before anything is loaded or written.

Where the numbers come from, in order of precedence:
- a checkpoint's step: its `step`, the `checkpoint-STEP` directory name, `global_step` of its trainer_state.json;
- a checkpoint's learning rate η_c: its `learning_rate`; the learning rate logged by the HF Trainer at the
  last logged step ≤ its step (trainer_state.json `log_history`); `training_run.learning_rate`;
- a segment's mean learning rate η̄_ℓ: its `learning_rate`; the mean of the rates logged in (T_ℓ−1, T_ℓ];
  the mean of its checkpoints' rates; `training_run.learning_rate`;
- a segment's steps K_ℓ: its `steps`; T_ℓ − T_ℓ−1 with T_ℓ its boundary (or its last checkpoint's step,
  or `total_steps` for the last segment) and T_0 = 0.
SGD with momentum β divides every rate by (1 − β). A rate or step count that is still unknown stays None
and `require_schedule` names it when a method needs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import CheckpointConfig, JobConfig, SegmentConfig, TrainingRunConfig
from engine.errors import TributaryError
from engine.model.loading import _architecture
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


@dataclass
class _Checkpoint:
    path: str
    step: int | None
    learning_rate: float | None


def _read_trainer_state(directory: Path) -> dict | None:
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TributaryError(f"training_run: {path} is not valid JSON ({error}); fix or remove it") from None
    return state if isinstance(state, dict) else None


def _step_of(directory: Path) -> int | None:
    match = CHECKPOINT_DIR.match(directory.name)
    if match:
        return int(match.group(1))
    state = _read_trainer_state(directory)
    step = state.get("global_step") if state else None
    return int(step) if isinstance(step, int) else None


def _discover(trainer_dir: str) -> list[_Checkpoint]:
    """checkpoint-STEP directories of an HF Trainer output_dir in step order, plus the final model saved in the
    directory itself when it is later than the last checkpoint (max_steps of the last trainer_state.json)."""
    root = Path(trainer_dir)
    if not root.is_dir():
        raise TributaryError(
            f"training_run.trainer_dir {trainer_dir} is not a directory; give the Trainer's output_dir"
        )
    found = sorted(
        (int(m.group(1)), child)
        for child in root.iterdir()
        if child.is_dir() and (m := CHECKPOINT_DIR.match(child.name))
    )
    checkpoints = [_Checkpoint(str(path.resolve()), step, None) for step, path in found]
    if (root / "config.json").is_file():
        last_state = _read_trainer_state(Path(checkpoints[-1].path)) if checkpoints else None
        final_step = (last_state or {}).get("max_steps")
        if not found or (isinstance(final_step, int) and final_step > found[-1][0]):
            checkpoints.append(
                _Checkpoint(str(root.resolve()), final_step if isinstance(final_step, int) else None, None)
            )
    if not checkpoints:
        raise TributaryError(
            f"training_run.trainer_dir {trainer_dir} holds no checkpoint-STEP directories and no "
            "model; point it at the Trainer's output_dir"
        )
    return checkpoints


def _listed(entries: list[str | CheckpointConfig]) -> list[_Checkpoint]:
    out = []
    for entry in entries:
        entry = CheckpointConfig(path=entry) if isinstance(entry, str) else entry
        out.append(_Checkpoint(str(Path(entry.path).resolve()), entry.step, entry.learning_rate))
    return out


def _check_directories(checkpoints: list[_Checkpoint]) -> None:
    """Every checkpoint is an HF model directory and all have the same architecture (config.json)."""
    reference = None
    for checkpoint in checkpoints:
        path = Path(checkpoint.path)
        if not (path / "config.json").is_file():
            raise TributaryError(
                f"training_run checkpoint {checkpoint.path} is not an HF model directory (no "
                "config.json); list model directories, or set trainer_dir"
            )
        architecture = _architecture(path)
        if reference is None:
            reference = (checkpoint.path, architecture)
            continue
        if architecture != reference[1]:
            keys = sorted(
                k
                for k in set(architecture or {}) | set(reference[1] or {})
                if (architecture or {}).get(k) != (reference[1] or {}).get(k)
            )
            shown = ", ".join(
                f"{k}: {(reference[1] or {}).get(k)!r} vs {(architecture or {}).get(k)!r}" for k in keys[:4]
            )
            raise TributaryError(
                f"training_run checkpoints {reference[0]} and {checkpoint.path} have different architectures "
                f"({shown}); every checkpoint of a run must be the same model at another step"
            )


def _history(checkpoints: list[_Checkpoint], trainer_dir: str | None) -> dict[int, float]:
    """Learning rate by logged step from every trainer_state.json found (later files win)."""
    directories = [Path(c.path) for c in checkpoints] + ([Path(trainer_dir)] if trainer_dir else [])
    rates: dict[int, float] = {}
    for directory in directories:
        state = _read_trainer_state(directory)
        for entry in (state or {}).get("log_history", []):
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("step"), int)
                and isinstance(entry.get("learning_rate"), (int, float))
            ):
                rates[entry["step"]] = float(entry["learning_rate"])
    return rates


def _rate_at(step: int | None, history: dict[int, float]) -> float | None:
    if step is None or not history:
        return None
    before = [s for s in history if s <= step]
    return history[max(before)] if before else history[min(history)]


def _segment_groups(run: TrainingRunConfig, checkpoints: list[_Checkpoint]) -> tuple[list[list[int]], list]:
    """Checkpoint indices per segment and the segments' own config entries (None for generated ones)."""
    if run.boundaries is not None:
        if isinstance(run.segments, list):
            raise TributaryError("training_run: give either segments (a list) or boundaries, not both")
        unknown = [c.path for c in checkpoints if c.step is None]
        if unknown:
            raise TributaryError(
                f"training_run.boundaries split checkpoints by step, but the step of {unknown[0]} is "
                "unknown; give its step, or use checkpoint-STEP directories"
            )
        lows: list[int] = [0, *sorted(run.boundaries)]
        highs: list[int | None] = [*sorted(run.boundaries), None]
        groups = []
        for index, (low, high) in enumerate(zip(lows, highs)):
            members = [
                i
                for i, c in enumerate(checkpoints)
                if c.step is not None and c.step > low and (high is None or c.step <= high)  # all known (above)
            ]
            if not members:
                span = f"({low}, {high}]" if high is not None else f"after step {low}"
                raise TributaryError(
                    f"training_run segment {index} (steps {span}) has no checkpoints; move the "
                    "boundaries or add a checkpoint in that range"
                )
            groups.append(members)
        return groups, [None] * len(groups)
    if isinstance(run.segments, int):
        if run.segments < 1 or run.segments > len(checkpoints):
            raise TributaryError(
                f"training_run.segments is {run.segments} but there are {len(checkpoints)} checkpoints: every "
                f"segment needs at least one checkpoint; use 1 to {len(checkpoints)} segments"
            )
        return [list(part) for part in np.array_split(np.arange(len(checkpoints)), run.segments)], [None] * run.segments
    groups = []
    for index, segment in enumerate(run.segments):
        if not segment.checkpoints:
            raise TributaryError(
                f"training_run.segments[{index}] has no checkpoints; list at least one checkpoint "
                "(a path or an index into training_run.checkpoints)"
            )
        groups.append([_checkpoint_index(entry, checkpoints, index) for entry in segment.checkpoints])
    return groups, list(run.segments)


def _checkpoint_index(entry: str | int, checkpoints: list[_Checkpoint], segment: int) -> int:
    if isinstance(entry, int):
        if not 0 <= entry < len(checkpoints):
            raise TributaryError(
                f"training_run.segments[{segment}] names checkpoint {entry}, but there are "
                f"{len(checkpoints)} (indices 0..{len(checkpoints) - 1})"
            )
        return entry
    path = str(Path(entry).resolve())
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint.path == path:
            return index
    checkpoints.append(_Checkpoint(path, _step_of(Path(path)), None))
    return len(checkpoints) - 1


def resolve_run(config: JobConfig) -> RunPlan | None:
    """The run described by `config.training_run` (None without one)."""
    run = config.training_run
    if run is None:
        return None
    if config.model.adapter is not None:
        raise TributaryError(
            "training_run with model.adapter is not supported; attribute the merged checkpoints "
            "(list full model directories)"
        )
    if run.optimizer.preconditioned and run.optimizer.name == "sgd":
        raise TributaryError(
            "training_run.optimizer.preconditioned needs optimizer adam or adamw (P = 1/(sqrt(v)+eps) "
            "from the optimizer state); remove it for SGD"
        )
    if run.checkpoints and run.trainer_dir:
        raise TributaryError("training_run: give either checkpoints or trainer_dir, not both")
    checkpoints = _discover(run.trainer_dir) if run.trainer_dir else _listed(run.checkpoints)
    if not checkpoints and not (isinstance(run.segments, list) and run.segments):
        raise TributaryError(
            "training_run has no checkpoints; list checkpoints, set trainer_dir, or list segments "
            "with their checkpoints"
        )
    for checkpoint in checkpoints:
        if checkpoint.step is None and Path(checkpoint.path).is_dir():
            checkpoint.step = _step_of(Path(checkpoint.path))
    groups, entries = _segment_groups(run, checkpoints)
    _check_directories(checkpoints)
    order = [i for group in groups for i in group]
    if sorted(order) != list(range(len(checkpoints))):
        missing = [checkpoints[i].path for i in range(len(checkpoints)) if i not in order]
        repeated = sorted({checkpoints[i].path for i in order if order.count(i) > 1})
        raise TributaryError(
            f"training_run: every checkpoint must be in exactly one segment (in none: {missing[:3]}, "
            f"in several: {repeated[:3]})"
        )
    history = _history(checkpoints, run.trainer_dir)
    scale = 1.0 / (1.0 - run.optimizer.momentum) if run.optimizer.name == "sgd" else 1.0
    datasets: list[str] = []
    plans, segments = [], []
    previous_end = 0
    for index, (group, entry) in enumerate(zip(groups, entries)):
        entry = entry or SegmentConfig(checkpoints=[])
        dataset_path = str(Path(entry.data).resolve()) if entry.data else config.data.train
        if dataset_path not in datasets:
            datasets.append(dataset_path)
        names = []
        for i in group:
            c = checkpoints[i]
            rate = c.learning_rate or _rate_at(c.step, history) or run.learning_rate
            name = ResourceKey.checkpoint(len(plans)).group_name
            plans.append(CheckpointPlan(name, index, c.path, None if rate is None else rate * scale, c.step))
            names.append(name)
        end = _segment_end(run, index, len(groups), [checkpoints[i].step for i in group])
        steps = entry.steps or (end - previous_end if end is not None and previous_end is not None else None)
        rate = (
            entry.learning_rate
            or _mean_rate(history, previous_end, end)
            or _mean_known([checkpoints[i].learning_rate or _rate_at(checkpoints[i].step, history) for i in group])
            or run.learning_rate
        )
        segments.append(
            SegmentPlan(
                index, tuple(names), None if rate is None else rate * scale, steps, datasets.index(dataset_path)
            )
        )
        previous_end = end
    return RunPlan(
        tuple(plans),
        tuple(segments),
        tuple(datasets),
        "sgd" if run.optimizer.name == "sgd" else "adam",
        run.optimizer.preconditioned,
        run.averaged,
    )


def _segment_end(run: TrainingRunConfig, index: int, count: int, steps: list[int | None]) -> int | None:
    if run.boundaries is not None and index < count - 1:
        return sorted(run.boundaries)[index]
    if index == count - 1 and run.total_steps is not None:
        return run.total_steps
    return steps[-1]


def _mean_rate(history: dict[int, float], low: int | None, high: int | None) -> float | None:
    if low is None or high is None:
        return None
    rates = [rate for step, rate in history.items() if low < step <= high]
    return float(np.mean(rates)) if rates else None


def _mean_known(rates: list[float | None]) -> float | None:
    known = [r for r in rates if r is not None]
    return float(np.mean(known)) if known and len(known) == len(rates) else None


def require_schedule(plan: RunPlan, method: str) -> None:
    """Raise, naming what to set, when `method` needs a learning rate or step count the run does not give."""
    if method == "tracin":
        for checkpoint in plan.checkpoints:
            if checkpoint.learning_rate is None:
                raise TributaryError(
                    f"method tracin needs the learning rate at checkpoint {checkpoint.path}, which cannot be inferred "
                    "(no trainer_state.json log_history covers it); give its learning_rate, or "
                    "training_run.learning_rate"
                )
    if method in ("source", "fast_source"):
        for segment in plan.segments:
            if segment.eta is None:
                raise TributaryError(
                    f"method {method} needs the mean learning rate of segment {segment.index}, which cannot be "
                    "inferred (no trainer_state.json log_history covers it); give training_run.segments[i]."
                    "learning_rate or training_run.learning_rate"
                )
            if segment.steps is None:
                raise TributaryError(
                    f"method {method} needs the optimizer steps of segment {segment.index}; give "
                    "training_run.segments[i].steps, the checkpoints' steps, or training_run.total_steps"
                )
