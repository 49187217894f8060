"""Reproduction 2 — Source vs IF by LDS (α = 0.5) where SOURCE says Source should win: a non-converged
model (a few epochs) and two-stage (continual) training, next to the converged model, on diabetes
(regression) and breast cancer (classification). Grad-Dot, TracInCP and random scores for context.

Two-stage: stage 1 trains on one half of the rows, stage 2 continues on the other half; an LDS subset
removes rows from both stages, and the retraining repeats both stages. IF sees the final model and all
rows; Source walks back through the two segments (four checkpoints each).

Default size (this 2-core CPU, ~2 min): M = 60 subsets × R = 3 seeds. --full: M = 100 × R = 10.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import first_line, write_result
from benchmarks.evaluation_common import COLOURS, NAMES, RESULTS, Clock, arguments, machine_line, markdown_table, plt
from engine.evaluation.lds import ground_truth, lds
from engine.evaluation.methods import all_scores, random_scores
from engine.evaluation.tasks import Task, tabular
from engine.evaluation.training import Recipe, Stage

METHODS = ("if", "source", "tracin", "grad_dot")
CACHE = "/tmp/tributary-eval-cache"


def settings(task: Task) -> dict[str, Task]:
    stage = task.recipe.stages[0]
    if stage.batch_size is None:
        raise ValueError(f"task {task.name}: the settings count epochs in mini-batches; its recipe is full-batch")
    per_epoch = -(-len(task.train) // stage.batch_size)
    half = len(task.train) // 2
    first, second = tuple(range(half)), tuple(range(half, len(task.train)))
    two_stage = Recipe(
        (
            Stage(15 * -(-half // stage.batch_size), stage.learning_rate, stage.batch_size, first),
            Stage(15 * -(-(len(task.train) - half) // stage.batch_size), stage.learning_rate, stage.batch_size, second),
        )
    )
    return {
        "converged (30 epochs)": task,
        "non-converged (2 epochs)": task.with_recipe(
            Recipe((Stage(2 * per_epoch, stage.learning_rate, stage.batch_size),)), "2-epochs"
        ),
        "two-stage (15 + 15 epochs)": task.with_recipe(two_stage, "two-stage"),
    }


def main() -> None:
    args = arguments(first_line(__doc__))
    subsets, seeds = (100, 10) if args.full else (60, 3)
    clock = Clock()
    results: dict[str, dict[str, dict]] = {}
    for base in (tabular("diabetes"), tabular("breast_cancer")):
        for setting, task in settings(base).items():
            final, run = task.train_reference(seed=0)
            scores = all_scores(task, final, run, METHODS)
            scores["random"] = random_scores(task)
            truth = ground_truth(
                task,
                0.5,
                subsets,
                seeds,
                workers=args.workers,
                cache=f"{CACHE}/{task.name.replace('/', '-')}-{subsets}-{seeds}",
            )
            results.setdefault(base.name, {})[setting] = {
                "task": task.summary(),
                "query_loss": float(task.measure(final).mean()),
                "lds": {m: lds(s, truth) for m, s in scores.items()},
            }
            print(base.name, setting, clock(), flush=True)
    write_result(
        "source_vs_if",
        {
            "size": "full" if args.full else "default",
            "subsets": subsets,
            "seeds": seeds,
            "results": results,
            "seconds": clock(),
        },
    )
    methods = list(METHODS) + ["random"]
    figure, axes = plt.subplots(1, len(results), figsize=(12, 4), sharey=True)
    rows = []
    for axis, (name, by_setting) in zip(axes, results.items()):
        positions = np.arange(len(by_setting))
        for offset, method in enumerate(methods):
            values = [by_setting[s]["lds"][method] for s in by_setting]
            mean = np.array([v["mean"] for v in values])
            error = np.array([[v["mean"] - v["ci95"][0], v["ci95"][1] - v["mean"]] for v in values]).T
            axis.bar(
                positions + 0.16 * offset - 0.32, mean, 0.16, yerr=error, color=COLOURS[method], label=NAMES[method]
            )
        axis.set_xticks(positions, [s.split(" (")[0] for s in by_setting])
        axis.set_title(f"{name}: LDS at α = 0.5 ({subsets} subsets × {seeds} seeds)")
        axis.grid(alpha=0.3, axis="y")
        for setting, result in by_setting.items():
            rows.append([name, setting] + [result["lds"][m]["mean"] for m in methods])
    axes[0].set_ylabel("LDS (mean, 95% bootstrap CI)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "source_vs_if.png", dpi=120)
    print(markdown_table(["task", "training"] + [NAMES[m] for m in methods], rows, RESULTS / "source_vs_if.md"))
    print(machine_line(), clock())


if __name__ == "__main__":
    main()
