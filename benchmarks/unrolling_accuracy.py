"""How well each method predicts the exact effect of removing a training example, on small models where
autograd through the whole training loop is cheap.

Two settings, each over several seeds (data and initialisation), full-batch SGD on an 8-32-1 tanh MLP:
- two segments: 40 examples, 20 steps at η = 0.3 then 20 at η = 0.1 (not converged), checkpoints every 10 steps;
- continual: 30 examples of task 1 for 20 steps at η = 0.3, then 30 of task 2 (shifted inputs, other weights)
  for 20 steps at η = 0.1; the effect of removing a task-1 example on task-1 queries.
The exact effect −dL_q(θ_T)/dε_i comes from autograd through every step (tests/unrolling.py, the tests'
independent reference); each method's scores come from engine.attribution.in_memory. Reported: Pearson and
Spearman correlation over training examples, mean over 8 queries, then mean and spread over seeds.

    python -m benchmarks.unrolling_accuracy [--seeds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import first_line, positive_int, write_result
from engine.attribution import Checkpoint, Dataset, InMemoryAttribution, Segment, TrainingRun, squared_error
from tests.unrolling import mean_correlation, mlp, removal_effect, sgd, train

QUERIES = 8


def _task(seed: int, count: int, shift: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 8, generator=generator, dtype=torch.float64) + shift
    w = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    return x, torch.sin(2 * x @ w) + 0.3 * torch.randn(count, 1, generator=generator, dtype=torch.float64)


def _methods(run: TrainingRun, final: InMemoryAttribution, model, queries: Dataset, columns: slice) -> dict:
    multi = InMemoryAttribution(model, squared_error(), run)
    out = {name: multi.scores(name, queries)[:, columns] for name in ("source", "fast_source", "tracin", "trak")}
    out.update({name: final.scores(name, queries)[:, columns] for name in ("if", "grad_dot", "datainf")})
    for damping in (1e-3, 1e-2, 1e-1):
        out[f"if_damping_{damping:g}"] = final.scores("if", queries, damping=damping)[:, columns]
    return out


def two_segments(seed: int) -> dict:
    n = 40
    model = mlp(8, 32, seed=seed)
    x, y = _task(seed, n + QUERIES)
    start = {name: p.detach() for name, p in model.named_parameters()}
    eps = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    final, checkpoints = train(model, start, [(x[:n], y[:n], 40)], sgd([0.3] * 20 + [0.1] * 20), [eps], every=10)
    exact = removal_effect(model, final, eps, (x[n:], y[n:]))
    data, queries = Dataset(x[:n], y[:n]), Dataset(x[n:], y[n:])
    rates = [0.3, 0.3, 0.1, 0.1]
    run = TrainingRun(
        [
            Segment(
                [Checkpoint(c, learning_rate=r) for c, r in zip(checkpoints[:2], rates[:2])], data, eta=0.3, steps=20
            ),
            Segment(
                [Checkpoint(c, learning_rate=r) for c, r in zip(checkpoints[2:], rates[2:])], data, eta=0.1, steps=20
            ),
        ],
        averaged=True,
    )
    final_only = InMemoryAttribution(model, squared_error(), TrainingRun.final_only(checkpoints[-1], data))
    scores = _methods(run, final_only, model, queries, slice(0, n))
    return {name: mean_correlation(s, exact) for name, s in scores.items()}


def continual(seed: int) -> dict:
    n1, n2 = 30, 30
    model = mlp(8, 32, seed=seed)
    x1, y1 = _task(seed, n1 + QUERIES)
    x2, y2 = _task(seed + 1000, n2, shift=1.0)
    start = {name: p.detach() for name, p in model.named_parameters()}
    eps = torch.zeros(n1, dtype=torch.float64, requires_grad=True)
    final, checkpoints = train(
        model, start, [(x1[:n1], y1[:n1], 20), (x2, y2, 20)], sgd([0.3] * 20 + [0.1] * 20), [eps, None], every=10
    )
    exact = removal_effect(model, final, eps, (x1[n1:], y1[n1:]))
    stage1, stage2, queries = Dataset(x1[:n1], y1[:n1]), Dataset(x2, y2), Dataset(x1[n1:], y1[n1:])
    rates = [0.3, 0.3, 0.1, 0.1]
    run = TrainingRun(
        [
            Segment(
                [Checkpoint(c, learning_rate=r) for c, r in zip(checkpoints[:2], rates[:2])], stage1, eta=0.3, steps=20
            ),
            Segment(
                [Checkpoint(c, learning_rate=r) for c, r in zip(checkpoints[2:], rates[2:])], stage2, eta=0.1, steps=20
            ),
        ],
        averaged=True,
    )
    union = Dataset(torch.cat([x1[:n1], x2]), torch.cat([y1[:n1], y2]))
    final_only = InMemoryAttribution(model, squared_error(), TrainingRun.final_only(checkpoints[-1], union))
    scores = _methods(run, final_only, model, queries, slice(0, n1))
    return {name: mean_correlation(s, exact) for name, s in scores.items()}


def _summary(per_seed: list[dict]) -> dict:
    out = {}
    for name in per_seed[0]:
        values = np.array([figures[name] for figures in per_seed])
        out[name] = {
            "pearson_mean": round(float(values[:, 0].mean()), 3),
            "pearson_min": round(float(values[:, 0].min()), 3),
            "spearman_mean": round(float(values[:, 1].mean()), 3),
            "spearman_min": round(float(values[:, 1].min()), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--seeds", type=positive_int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {}
    for setting, run in (("two_segments", two_segments), ("continual", continual)):
        per_seed = [run(seed) for seed in range(args.seeds)]
        results[setting] = _summary(per_seed)
        print(setting)
        for name, figures in results[setting].items():
            print(
                f"  {name:<22} Pearson {figures['pearson_mean']:.3f} (min {figures['pearson_min']:.3f})  "
                f"Spearman {figures['spearman_mean']:.3f} (min {figures['spearman_min']:.3f})"
            )
    path = write_result(
        "unrolling_accuracy",
        {
            "seeds": args.seeds,
            "queries": QUERIES,
            "results": results,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
