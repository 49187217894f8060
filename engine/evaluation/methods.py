"""Scores of every attribution method for a task, in training-row order, through `InMemoryAttribution`.

Final-model methods (grad_dot, grad_cos, if, trak, datainf) see the final model and every training row;
the methods that use the training run (source, fast_source, tracin) get its checkpoints, one segment per
stage, and their per-stage score columns are put back in training-row order. FiMO's final-model-only
Source is `source` on the final model with the further-training learning rate and step count (`eta`,
`steps`): one segment, r = (1 − e^{−ηKλ})/λ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.attribution.in_memory import InMemoryAttribution, Settings, TrainingRun
from engine.config import METHODS, MethodConfig
from engine.evaluation.training import Parameters

FINAL_MODEL = tuple(spec.name for spec in METHODS if not spec.training_run)
ALONG_TRAINING = tuple(spec.name for spec in METHODS if spec.training_run)


def final_model_scores(
    task, final: Parameters, methods: Sequence[MethodConfig | str], settings: Settings = Settings()
) -> dict[str, np.ndarray]:
    """(Q, N) scores of each method on the final model alone (FiMO's setting). Methods given as
    MethodConfigs are labelled by name, or by `name@steps` when they set steps (Source at several K)."""
    attribution = final_model_attribution(task, final, settings)
    out = {}
    for method in methods:
        config = method if isinstance(method, MethodConfig) else MethodConfig.model_validate({"name": method})
        out[label(config)] = attribution.scores(config, task.queries)
    return out


def scores_with(attribution: InMemoryAttribution, task, methods: Sequence[MethodConfig | str]) -> dict[str, np.ndarray]:
    out = {}
    for method in methods:
        config = method if isinstance(method, MethodConfig) else MethodConfig.model_validate({"name": method})
        out[label(config)] = attribution.scores(config, task.queries)
    return out


def final_model_attribution(task, final: Parameters, settings: Settings = Settings()) -> InMemoryAttribution:
    """One attribution object per model: its factors and gradients are computed once for every method."""
    return InMemoryAttribution(task.model, task.loss, TrainingRun.final_only(final, task.train), settings)


def run_scores(task, run: TrainingRun, method: MethodConfig | str, settings: Settings = Settings()) -> np.ndarray:
    """(Q, N) scores of a method that uses the training run's checkpoints, in training-row order."""
    config = method if isinstance(method, MethodConfig) else MethodConfig.model_validate({"name": method})
    if run.averaged != (config.name == "fast_source"):
        run = TrainingRun(run.segments, run.optimizer, averaged=config.name == "fast_source")
    attribution = InMemoryAttribution(task.model, task.loss, run, settings)
    raw = attribution.scores(config, task.queries)
    full = np.zeros((len(task.queries), len(task.train)))
    seen: list = []
    for segment, stage in zip(run.segments, task.recipe.stages):
        if any(segment.data is d for d in seen):
            continue
        columns = attribution.columns(len(seen))
        seen.append(segment.data)
        rows = np.arange(len(task.train)) if stage.examples is None else np.asarray(stage.examples)
        full[:, rows] += raw[:, columns]
    return full


def all_scores(
    task, final: Parameters, run: TrainingRun, methods: Sequence[str], settings: Settings = Settings()
) -> dict[str, np.ndarray]:
    finals = [m for m in methods if m in FINAL_MODEL]
    out = final_model_scores(task, final, finals, settings) if finals else {}
    for method in methods:
        if method in ALONG_TRAINING:
            out[method] = run_scores(task, run, method, settings)
    return {m: out[m] for m in methods}


def label(config: MethodConfig) -> str:
    return config.name if config.steps is None else f"{config.name}@{config.steps}"


def random_scores(task, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(task.queries), len(task.train)))
