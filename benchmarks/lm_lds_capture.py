"""LM LDS of Source from the store captured while training against Source from the checkpoint-based store.

The LM LDS task of benchmarks/lm_lds.py (a 2-layer, 128-wide GPT-2 trained from scratch on 256 windows of Hamlet, 32
held-out query windows; its ground truth of 64 half-subsets × 2 seeds, cached in benchmarks/results/lm_lds_truth.zarr
and reused). The full-data model is trained with the task's recipe (AdamW, lr 1e-3, 12 epochs of shuffled batches of
16, seed 0) twice, in one process each time:

- captured: with TrainingCapture (engine.integrations' step API) writing a training-run store of `--segments`
  segments from the training backward; `tributary query` (method source) reads it with no index pass;
- checkpoints: without capture, saving the weights at the same segment boundaries; `tributary index` of those
  checkpoints (training_run.checkpoints, one segment each), then the same query.

Both stores: EK-FAC, the true Fisher (sampled labels), rademacher projection of `--dim` per side, float32; Source
without Adam preconditioning. Reported: each path's LDS (mean over queries, 95% bootstrap CI) and its cost in
seconds: training (capture included), index, query, and the total. The machine's load average is recorded.

    python -m benchmarks.lm_lds_capture [--dim 16] [--segments 4]     (a few minutes on 2 busy CPU cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import first_line, positive_int, write_result
from benchmarks.evaluation_common import machine_line
from benchmarks.lm_lds import CACHE, FULL_MODEL_SEED, MASK_SEED, ground_truth, truth_key, write_rows
from benchmarks.lm_lds_task import LMTask, TaskSpec, build_model, build_task
from engine.config import JobConfig, parse_config
from engine.evaluation.lds import lds

SUBSETS, SEEDS = 64, 2  # the committed ground truth's


def config(task: LMTask, work: Path, store: str, dim: int, training_run: dict) -> JobConfig:
    return parse_config(
        {
            "model": {"path": str(work / "init"), "dtype": "float32"},
            "data": {"train": str(work / "train.jsonl"), "max_length": task.spec.window, "batch_size": 32},
            "projection": {"dim": dim, "seed": 0, "kind": "rademacher"},
            "curvature": {"strategy": "ekfac", "fisher": True, "seed": 0},
            "method": {"name": "source", "damping": None},
            "training_run": training_run,
            "store": {"path": str(work / store), "dtype": "float32"},
        }
    )


def boundaries(steps: int, segments: int) -> list[int]:
    return [round(steps * k / segments) for k in range(1, segments)]


def train(task: LMTask, work: Path, job: JobConfig, capture: bool, save_at: list[int]) -> float:
    """The task's recipe on every training row (seed FULL_MODEL_SEED), as benchmarks.lm_lds_task.train_model runs
    it, through the model's own loss (labels) on the rows of `job`: with capture into job's store, or saving the
    weights after the steps in `save_at`; the seconds it took."""
    from engine.integrations import TrainingCapture, TrainingRows

    recipe = task.spec.recipe
    started = time.perf_counter()
    model = build_model(task.spec.architecture, len(task.vocabulary), task.spec.window, FULL_MODEL_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    rows = TrainingRows(job)
    capturing = TrainingCapture(job, model, optimizer, rows) if capture else None
    order = torch.Generator().manual_seed(FULL_MODEL_SEED)
    model.train()
    step = 0
    for _ in range(recipe.epochs):
        permutation = torch.randperm(len(rows), generator=order).tolist()
        for start in range(0, len(rows), recipe.batch_size):
            chosen = [rows[i] for i in permutation[start : start + recipe.batch_size]]
            if capturing is None:
                model(**rows.plain_collate(chosen)).loss.backward()
            else:
                with capturing.step():
                    model(**rows.collate(chosen)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step in save_at:
                model.save_pretrained(work / "checkpoints" / f"step-{step}")
                task.tokenizer().save_pretrained(work / "checkpoints" / f"step-{step}")
    if capturing is not None:
        capturing.close()
    return time.perf_counter() - started


def timed(call) -> tuple[object, float]:
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--dim", type=positive_int, default=16, help="projection dim per side")
    parser.add_argument("--segments", type=positive_int, default=4, help="Source's segments (equal parts of training)")
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="override the recipe's 12 epochs (a smoke run: LDS not comparable)",
    )
    parser.add_argument("--workdir", default="/tmp/tributary-lm-lds-capture")
    parser.add_argument("--name", default="lm_lds_capture", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from engine.local_or_ray import run_index, run_query

    load_before = os.getloadavg()
    task = build_task(TaskSpec())
    truth, truth_timing = ground_truth(task, 0.5, SUBSETS, SEEDS, workers=2, cache=CACHE)
    if args.epochs is not None:  # the ground truth stays the recipe's (its cache key); the trained model does not
        task = replace(task, spec=replace(task.spec, recipe=replace(task.spec.recipe, epochs=args.epochs)))
    if not truth_timing["reused"]:
        print("the ground truth was computed, not read from the committed cache", flush=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_rows(work / "train.jsonl", "train", task.train_texts)
    queries = write_rows(work / "queries.jsonl", "query", task.query_texts)
    build_model(task.spec.architecture, len(task.vocabulary), task.spec.window, FULL_MODEL_SEED).save_pretrained(
        work / "init"
    )
    task.tokenizer().save_pretrained(work / "init")
    steps = task.spec.recipe.epochs * -(-len(task.train_texts) // task.spec.recipe.batch_size)
    cuts = boundaries(steps, args.segments)
    rate = task.spec.recipe.learning_rate
    optimizer = {"name": "adamw"}

    captured = config(
        task, work, "captured.zarr", args.dim, {"boundaries": cuts, "total_steps": steps, "optimizer": optimizer}
    )
    capture_train_s = train(task, work, captured, True, [])
    _, capture_query_s = timed(lambda: run_query(captured, str(queries), k=10, scores_out=str(work / "captured.npy")))

    plain_train_s = train(task, work, captured, False, [*cuts, steps])
    checkpoints = [
        {"path": str(work / "checkpoints" / f"step-{s}"), "learning_rate": rate, "step": s} for s in [*cuts, steps]
    ]
    indexed = config(
        task,
        work,
        "indexed.zarr",
        args.dim,
        {"checkpoints": checkpoints, "segments": args.segments, "learning_rate": rate, "optimizer": optimizer},
    )
    _, index_s = timed(lambda: run_index(indexed, overwrite=True, show_progress=False))
    _, index_query_s = timed(lambda: run_query(indexed, str(queries), k=10, scores_out=str(work / "indexed.npy")))

    results = {}
    for name, scores, train_s, index, query_s in (
        ("captured", "captured.npy", capture_train_s, 0.0, capture_query_s),
        ("checkpoints_index", "indexed.npy", plain_train_s, index_s, index_query_s),
    ):
        results[name] = {
            "lds": lds(np.load(work / scores), truth),
            "seconds": {
                "train": round(train_s, 2),
                "index": round(index, 2),
                "query": round(query_s, 2),
                "total": round(train_s + index + query_s, 2),
            },
        }
    payload = {
        "what": "LDS of Source on the LM LDS task: the store captured while training (no index pass) against "
        "`tributary index` of checkpoints saved at the same segment boundaries; each path's cost, training included",
        "task": task.summary(),
        "ground_truth": truth_key(task, 0.5, SUBSETS, SEEDS) | {"reused": truth_timing["reused"]},
        "mask_seed": MASK_SEED,
        "optimizer_steps": steps,
        "segment_boundaries": cuts,
        "projection_dim": args.dim,
        "epochs": task.spec.recipe.epochs,
        "curvature": "ekfac, true Fisher",
        "results": results,
        "capture_total_over_index_total": results["captured"]["seconds"]["total"]
        / results["checkpoints_index"]["seconds"]["total"],
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "cpus": os.cpu_count(),
    }
    path = write_result(args.name, payload)
    print(json.dumps(results, indent=1))
    print(f"-> {path}\n{machine_line()}")


if __name__ == "__main__":
    main()
