"""Reproduction 1 — FiMO Fig. 2's shape: cosine similarity with the further-training gold standard vs the
amount of further training, for Grad-Dot, Grad-Cos, IF (EK-FAC), Source and TRAK-style, on a tabular
task (diabetes regression) and a text task (next-character model on Hamlet).

Gold standard (engine.evaluation.gold_standard): from the final model, further SGD at 1/10 of the
training learning rate on D and on D∖{i} for L left-out examples, S paired seeds (tabular: the same batch
order minus i; text: leave_out_every_batch), mean-adjusted over the left-out set. Source is FiMO's
final-model-only Source: one segment at the final model with η = the further-training rate and K = the
number of further steps, so its scores change along the x axis; the other methods' do not.

Default size (this 2-core CPU, ~2 min): L = 40 left out, S = 8 seeds, 50 queries, steps up to 1000.
--full: L = 100, S = 50, 100 queries (FiMO: 100 left out, 100 seeds, 100 test points).
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import first_line, write_result
from benchmarks.evaluation_common import COLOURS, NAMES, RESULTS, Clock, arguments, machine_line, markdown_table, plt
from engine.attribution.in_memory import Settings
from engine.config import MethodConfig, ProjectionConfig
from engine.evaluation.gold_standard import agreement, further_recipe, gold_standard
from engine.evaluation.methods import final_model_attribution, final_model_scores, scores_with
from engine.evaluation.tasks import load_task

METHODS = ("grad_dot", "grad_cos", "if", "trak", "source")


def evaluate(name: str, mode: str, left_out_count: int, seeds: int, queries: int, workers: int) -> dict:
    clock = Clock()
    task = load_task(name, queries=queries)
    final, _ = task.train_reference(seed=0)
    stage = task.recipe.stages[0]
    rate = stage.learning_rate / 10  # FiMO: further training at 1/10 of the initial learning rate
    steps = [1, 3, 10, 30, 100, 300, 1000]
    recipe = further_recipe(max(steps), rate, stage.batch_size)
    left_out = np.sort(np.random.default_rng(0).choice(len(task.train), left_out_count, replace=False))
    gold = gold_standard(task, final, left_out, recipe, steps, seeds=seeds, mode=mode, workers=workers)
    trained = clock()
    attribution = final_model_attribution(task, final)
    fixed = scores_with(attribution, task, [m for m in METHODS if m not in ("source", "trak")])
    # TRAK projects its gradients (here to 32 per side: the text model's first layer is 136 x 32 wide)
    fixed["trak"] = final_model_scores(task, final, ["trak"], Settings(projection=ProjectionConfig(dim=32)))["trak"]
    source = [
        scores_with(attribution, task, [MethodConfig(name="source", eta=rate, steps=k)])[f"source@{k}"] for k in steps
    ]
    curves = {}
    for metric in ("cosine", "spearman"):
        curves[metric] = {m: agreement(fixed[m], gold, metric) for m in fixed}
        curves[metric]["source"] = agreement(None, gold, metric, per_step_scores=source)
    return {
        "task": task.summary(),
        "mode": mode,
        "left_out": int(left_out_count),
        "seeds": seeds,
        "further_learning_rate": rate,
        "batch_size": stage.batch_size,
        "steps": steps,
        "gold_seed_variance": gold.seed_variance().tolist(),
        "curves": curves,
        "seconds": {"gold_standard": trained, "total": clock()},
    }


def main() -> None:
    args = arguments(first_line(__doc__))
    size = (
        dict(left_out_count=100, seeds=50, queries=100) if args.full else dict(left_out_count=40, seeds=8, queries=50)
    )
    results = {}
    for kind, name, mode in (("tabular", "diabetes", "remove"), ("text", "shakespeare", "every_batch")):
        results[kind] = evaluate(name, mode, workers=args.workers, **size)
        print(kind, results[kind]["seconds"], flush=True)
    write_result("fimo_gold_standard", {"size": "full" if args.full else "default", "results": results})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    rows = []
    for axis, (kind, result) in zip(axes, results.items()):
        steps = result["steps"]
        for method in METHODS:
            curve = result["curves"]["cosine"][method]
            mean, sem = np.array(curve["mean"]), np.array(curve["sem"])
            axis.plot(steps, mean, marker="o", color=COLOURS[method], label=NAMES[method])
            axis.fill_between(steps, mean - sem, mean + sem, color=COLOURS[method], alpha=0.15)
            rows.append([result["task"]["task"], NAMES[method]] + [float(v) for v in mean])
        axis.set_xscale("log")
        axis.set_xlabel("further-training steps")
        axis.set_title(f"{result['task']['task']} ({kind}; {result['left_out']} left out, {result['seeds']} seeds)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("cosine with gold standard (mean ± SEM)")
    axes[0].legend()
    figure.suptitle("FiMO Fig. 2 shape: agreement with the further-training gold standard")
    figure.tight_layout()
    figure.savefig(RESULTS / "fimo_gold_standard.png", dpi=120)
    header = ["task", "method"] + [f"T={t}" for t in results["tabular"]["steps"]]
    table = markdown_table(header, rows, RESULTS / "fimo_gold_standard.md")
    print(table)
    print(machine_line(), {k: r["seconds"] for k, r in results.items()})


if __name__ == "__main__":
    main()
