"""What `tributary eval lds|gold|removal` does: build a task, train its reference model, score the methods,
evaluate them. Returns a JSON-ready dict; the CLI only parses options and prints it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.attribution.in_memory import Settings
from engine.config import MethodConfig, ProjectionConfig
from engine.errors import TributaryError
from engine.evaluation.gold_standard import agreement, further_recipe, gold_standard
from engine.evaluation.lds import ground_truth, lds
from engine.evaluation.methods import (
    ALONG_TRAINING,
    FINAL_MODEL,
    all_scores,
    final_model_attribution,
    random_scores,
    scores_with,
)
from engine.evaluation.removal import subset_removal
from engine.evaluation.tasks import load_task

KNOWN = FINAL_MODEL + ALONG_TRAINING + ("random",)


def _methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in KNOWN]
    if unknown or not methods:
        raise TributaryError(f"methods {unknown or '(none)'}: use a comma-separated list of {', '.join(KNOWN)}")
    return list(methods)


def _scores(task, methods: list[str], projection_dim: int) -> dict[str, np.ndarray]:
    final, run = task.train_reference(seed=0)
    settings = Settings(projection=ProjectionConfig(dim=projection_dim))
    scores = all_scores(task, final, run, [m for m in methods if m != "random"], settings)
    if "random" in methods:
        scores["random"] = random_scores(task)
    return {m: scores[m] for m in methods}


def run_lds(
    task_name: str,
    methods: Sequence[str],
    alpha: float,
    subsets: int,
    seeds: int,
    cache: str | None,
    workers: int,
    projection_dim: int = 0,
) -> dict:
    methods = _methods(methods)
    task = load_task(task_name)
    truth = ground_truth(task, alpha, subsets, seeds, workers=workers, cache=cache)
    scores = _scores(task, methods, projection_dim)
    return {
        "task": task.summary(),
        "alpha": alpha,
        "subsets": subsets,
        "seeds": seeds,
        "ground_truth_reused": truth.reused,
        "lds": {m: lds(s, truth) for m, s in scores.items()},
    }


def run_gold(
    task_name: str,
    methods: Sequence[str],
    left_out: int,
    seeds: int,
    steps: Sequence[int],
    mode: str,
    paired: bool,
    workers: int,
    mean_adjust: bool = True,
) -> dict:
    methods = _methods(methods)
    task = load_task(task_name)
    if not 0 < left_out <= len(task.train):
        raise TributaryError(f"--left-out {left_out} must lie in 1..{len(task.train)} (the task's training rows)")
    final, _ = task.train_reference(seed=0)
    stage = task.recipe.stages[0]
    rate = stage.learning_rate / 10
    chosen = np.sort(np.random.default_rng(0).choice(len(task.train), left_out, replace=False))
    gold = gold_standard(
        task,
        final,
        chosen,
        further_recipe(max(steps), rate, stage.batch_size),
        list(steps),
        seeds,
        mode,
        paired,
        workers=workers,
    )
    attribution = final_model_attribution(task, final)
    out = {}
    for method in methods:
        if method == "source":  # FiMO's final-model-only Source: K = the further-training steps
            per_step = [
                scores_with(attribution, task, [MethodConfig(name="source", eta=rate, steps=k)])[f"source@{k}"]
                for k in steps
            ]
            out[method] = {
                metric: agreement(None, gold, metric, mean_adjust, per_step) for metric in ("cosine", "spearman")
            }
            continue
        if method in ALONG_TRAINING:
            raise TributaryError(
                f"method {method} needs training checkpoints; the gold standard compares final-model "
                "methods (grad_dot, grad_cos, if, trak, datainf, source, random)"
            )
        matrix = random_scores(task) if method == "random" else scores_with(attribution, task, [method])[method]
        out[method] = {metric: agreement(matrix, gold, metric, mean_adjust) for metric in ("cosine", "spearman")}
    return {
        "task": task.summary(),
        "mode": mode,
        "paired": paired,
        "left_out": left_out,
        "seeds": seeds,
        "steps": list(steps),
        "further_learning_rate": rate,
        "gold_seed_variance": gold.seed_variance().tolist() if seeds > 1 else None,
        "agreement": out,
    }


def run_removal(task_name: str, methods: Sequence[str], k_values: Sequence[int], seeds: int, workers: int) -> dict:
    methods = _methods(methods)
    task = load_task(task_name)
    scores = _scores(task, methods, 0)
    return {
        "task": task.summary(),
        "removal": {m: subset_removal(task, s, list(k_values), seeds, workers=workers) for m, s in scores.items()},
    }
