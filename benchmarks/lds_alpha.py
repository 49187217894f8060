"""Reproduction 3 — LDS of every method at α ∈ {0.1, 0.3, 0.5, 0.7, 0.9} on one task (digits 8×8,
MLP 64-32-10), LDS vs projection dimension (0 = exact, 64, 16, 4) at α = 0.5, and subset removal
(fraction of correctly classified queries flipped when each query's top-k supporters are removed).

Default size (this 2-core CPU, ~4 min): M = 40 subsets × R = 2 seeds per α, 60 queries; removal k ∈
{10, 30} over 2 seeds. --full: M = 100 × R = 5 (SOURCE: 100 subsets, 5-100 repeats), removal k ∈
{10, 20, 40, 80} over 3 seeds. Ground truth is cached (--cache) and reused by every method and dimension.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import first_line, write_result
from benchmarks.evaluation_common import COLOURS, NAMES, RESULTS, Clock, arguments, machine_line, markdown_table, plt
from engine.attribution.in_memory import Settings
from engine.config import ProjectionConfig
from engine.evaluation.lds import ground_truth, lds
from engine.evaluation.methods import all_scores, random_scores
from engine.evaluation.removal import subset_removal
from engine.evaluation.tasks import tabular

METHODS = ("grad_dot", "grad_cos", "if", "datainf", "trak", "tracin", "source", "fast_source")
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
DIMS = (0, 64, 16, 4)
PROJECTED = ("grad_dot", "if", "trak", "source")
REMOVED = ("grad_dot", "if", "source", "random")
CACHE = "/tmp/tributary-eval-cache"


def main() -> None:
    args = arguments(first_line(__doc__))
    subsets, seeds = (100, 5) if args.full else (40, 2)
    removal_k, removal_seeds = ((10, 20, 40, 80), 3) if args.full else ((10, 30), 2)
    clock = Clock()
    task = tabular("digits", hidden=32)
    final, run = task.train_reference(seed=0)
    scores = all_scores(task, final, run, METHODS)
    scores["random"] = random_scores(task)
    by_alpha: dict[str, list[dict]] = {m: [] for m in scores}
    truths = {}
    for alpha in ALPHAS:
        truths[alpha] = ground_truth(
            task, alpha, subsets, seeds, workers=args.workers, cache=f"{CACHE}/digits-{alpha}-{subsets}-{seeds}"
        )
        for method, matrix in scores.items():
            by_alpha[method].append(lds(matrix, truths[alpha]))
        print("alpha", alpha, clock(), flush=True)
    by_dim: dict[str, list[dict]] = {m: [] for m in PROJECTED}
    for dim in DIMS:
        projected = all_scores(task, final, run, PROJECTED, Settings(projection=ProjectionConfig(dim=dim)))
        for method in PROJECTED:
            by_dim[method].append(lds(projected[method], truths[0.5]))
    removal = {m: subset_removal(task, scores[m], removal_k, removal_seeds, workers=args.workers) for m in REMOVED}
    print("removal", clock(), flush=True)
    write_result(
        "lds_alpha",
        {
            "task": task.summary(),
            "size": "full" if args.full else "default",
            "subsets": subsets,
            "seeds": seeds,
            "alphas": list(ALPHAS),
            "lds_by_alpha": by_alpha,
            "dims": list(DIMS),
            "lds_by_projection_dim": by_dim,
            "subset_removal": removal,
            "seconds": clock(),
        },
    )
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, values in by_alpha.items():
        mean = np.array([v["mean"] for v in values])
        low, high = np.array([v["ci95"][0] for v in values]), np.array([v["ci95"][1] for v in values])
        axes[0].plot(ALPHAS, mean, marker="o", color=COLOURS[method], label=NAMES[method])
        axes[0].fill_between(ALPHAS, low, high, color=COLOURS[method], alpha=0.12)
    axes[0].set(
        xlabel="α (fraction of training data kept)",
        ylabel="LDS (mean, 95% bootstrap CI)",
        title=f"digits: LDS vs α ({subsets} subsets × {seeds} seeds)",
    )
    positions = np.arange(len(DIMS))
    for offset, method in enumerate(PROJECTED):
        values = by_dim[method]
        mean = np.array([v["mean"] for v in values])
        error = np.array([[v["mean"] - v["ci95"][0], v["ci95"][1] - v["mean"]] for v in values]).T
        axes[1].bar(positions + 0.2 * offset - 0.3, mean, 0.2, yerr=error, color=COLOURS[method], label=NAMES[method])
    axes[1].set_xticks(positions, ["exact" if d == 0 else str(d) for d in DIMS])
    axes[1].set(xlabel="projection dim per side", ylabel="LDS at α = 0.5", title="what compression costs")
    for method, result in removal.items():
        axes[2].plot(result["k"], result["value"], marker="o", color=COLOURS[method], label=NAMES[method])
    axes[2].set(
        xlabel="top-k supporters removed",
        ylabel="fraction of queries flipped",
        title=f"subset removal ({removal['if']['eligible_queries']} queries)",
    )
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "lds_alpha.png", dpi=120)
    rows = [[NAMES[m]] + [v["mean"] for v in by_alpha[m]] for m in by_alpha]
    text = markdown_table(["method"] + [f"α={a}" for a in ALPHAS], rows, RESULTS / "lds_alpha.md")
    rows = [[NAMES[m]] + [v["mean"] for v in by_dim[m]] for m in PROJECTED]
    text += "\n" + markdown_table(
        ["method (α=0.5)"] + ["exact" if d == 0 else f"dim {d}" for d in DIMS], rows, RESULTS / "lds_projection.md"
    )
    rows = [[NAMES[m]] + [float(v) for v in removal[m]["value"]] for m in REMOVED]
    text += "\n" + markdown_table(["method"] + [f"k={k}" for k in removal_k], rows, RESULTS / "subset_removal.md")
    print(text)
    print(machine_line(), clock())


if __name__ == "__main__":
    main()
