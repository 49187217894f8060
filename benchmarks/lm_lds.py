"""LM LDS through the store — `tributary index` / `tributary query` on a small GPT-2 trained on Hamlet windows.

Task (benchmarks/lm_lds_task.py): a 2-layer, 128-wide, 4-head GPT-2 trained from scratch on N = 256 windows of
32 words of Hamlet; Q = 32 held-out windows are the queries. Ground truth: M = 64 random half-subsets (α = 0.5)
× R = 2 seeds, each retrained from scratch with the same recipe on a pool of `--workers` processes; y_j(q) is the
seed-mean of query q's summed next-token loss (the engine's `logprob_sum` of a {text} row). It is cached in Zarr
(`--cache`, default benchmarks/results/lm_lds_truth.zarr, committed) under a fingerprint of the data,
vocabulary, architecture, recipe and seeds, reused when it matches and refused when it does not.

Scores: the full-data model (seed 0) is saved with its tokenizer; every (method, projection kind, dim) gets a
YAML config and goes through the CLI users run: `tributary index CONFIG`, then `tributary query CONFIG
--queries queries.jsonl --scores-out S.npy`. Methods: EK-FAC IF, K-FAC IF, Grad-Dot; dims 0 (exact) and 8, 16,
32, 64 per side; kinds from `--kinds` (dim 0 is exact for every kind, so it is run once, as `exact`).
LDS (engine.evaluation.lds) is the per-query Spearman between measured losses and −Σ_{i∈S} score, mean over
queries with a 95% bootstrap CI; each is also given as a fraction of exact EK-FAC's LDS.

    python -m benchmarks.lm_lds                                     # rademacher (default)
    python -m benchmarks.lm_lds --kinds rademacher,kfac_eigen,eigen_sketch [--fit-rows 128] [--fit sketch]
    python -m benchmarks.lm_lds --full                              # M = 128 × R = 3 (own --cache)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import first_line, non_negative_int, positive_int, write_result
from benchmarks.evaluation_common import RESULTS, machine_line, markdown_table, plt
from benchmarks.lm_lds_task import LMTask, TaskSpec, build_task, retrain_subsets, save_full_model
from engine.evaluation.cache import load_or_compute
from engine.evaluation.lds import GroundTruth, lds, subset_masks

REPOSITORY = Path(__file__).resolve().parent.parent
CACHE = RESULTS / "lm_lds_truth.zarr"
RANDOM_KINDS = ("rademacher", "gaussian")  # data-independent: dim 0 is the same exact run for each
METHODS = {  # name -> (curvature.strategy, method.name)
    "ekfac": ("ekfac", "if"),
    "kfac": ("kfac", "if"),
    "grad_dot": ("identity", "grad_dot"),
}
LABELS = {"ekfac": "EK-FAC IF", "kfac": "K-FAC IF", "grad_dot": "Grad-Dot"}
COLOURS = {"ekfac": "tab:red", "kfac": "tab:orange", "grad_dot": "tab:blue"}
STYLES = ("-", "--", ":", "-.")
MASK_SEED = 1414
RUN_SEED_BASE = 14_000  # run (subset j, repeat r) trains with seed RUN_SEED_BASE + j * R + r
FULL_MODEL_SEED = 0
CLI = str(Path(sys.executable).parent / "tributary")  # the venv's entry point


# ---- ground truth ---------------------------------------------------------------------------------------


def truth_key(task: LMTask, alpha: float, subsets: int, seeds: int) -> dict:
    return {
        "job": "lm_lds",
        "task": task.name,
        "fingerprint": task.fingerprint(),
        "alpha": alpha,
        "subsets": subsets,
        "seeds": seeds,
        "mask_seed": MASK_SEED,
        "run_seed_base": RUN_SEED_BASE,
    }


def run_seeds(subsets: int, seeds: int) -> np.ndarray:
    return np.array([RUN_SEED_BASE + j * seeds + r for j in range(subsets) for r in range(seeds)])


def ground_truth(
    task: LMTask, alpha: float, subsets: int, seeds: int, workers: int, cache: Path | None
) -> tuple[GroundTruth, dict]:
    """Retrained query losses on M α-subsets × R seeds, or the cached ones for the same key.
    Returns the truth and its timing (seconds of the run that computed it, whether it was reused)."""

    def compute() -> dict[str, np.ndarray]:
        start = time.perf_counter()
        masks = subset_masks(len(task.train_texts), alpha, subsets, MASK_SEED)
        values, seconds = retrain_subsets(task, np.repeat(masks, seeds, axis=0), run_seeds(subsets, seeds), workers)
        return {
            "masks": masks,
            "measurements": values.reshape(subsets, seeds, -1),
            "run_seconds": seconds.reshape(subsets, seeds),
            "wall_seconds": np.array([time.perf_counter() - start]),
        }

    arrays, reused = load_or_compute(cache, truth_key(task, alpha, subsets, seeds), compute)
    timing = {
        "reused": reused,
        "wall_seconds": float(arrays["wall_seconds"][0]),
        "mean_run_seconds": float(arrays["run_seconds"].mean()),
        "runs": int(arrays["run_seconds"].size),
        "workers": workers,
    }
    return GroundTruth(arrays["masks"].astype(bool), arrays["measurements"], reused), timing


# ---- the configurations and the CLI runs --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    method: str  # a key of METHODS
    kind: str  # projection.kind; "exact" for dim 0
    dim: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.kind}-{self.dim}"


def settings(methods: list[str], kinds: list[str], dims: list[int]) -> list[Setting]:
    """Dim 0 once per method (exact whatever the kind); every other dim for every kind."""
    plan = [Setting(m, "exact", 0) for m in methods if 0 in dims]
    plan += [Setting(m, kind, d) for m in methods for kind in kinds for d in dims if d != 0]
    return plan


def job_config(setting: Setting, work: Path, fit_rows: int | None, window: int, fit: str = "exact") -> dict:
    strategy, method = METHODS[setting.method]
    projection: dict = {
        "dim": setting.dim,
        "seed": 0,
        "kind": "rademacher" if setting.kind == "exact" else setting.kind,
    }
    if setting.kind not in ("exact", *RANDOM_KINDS):
        projection["fit"] = fit
        if fit_rows is not None:
            projection["fit_rows"] = fit_rows
    return {
        "model": {"path": str(work / "model"), "dtype": "float32"},
        "data": {"train": str(work / "train.jsonl"), "max_length": window, "batch_size": 32},
        "projection": projection,
        "curvature": {"strategy": strategy, "fisher": True, "seed": 0},
        "method": {"name": method, "damping": None},
        "store": {"path": str(work / "stores" / f"{setting.name}.zarr"), "dtype": "float32"},
    }


def cli_environment() -> dict[str, str]:
    environment = dict(os.environ)
    paths = [str(REPOSITORY)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment.update(
        PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    return environment


def tributary(executable: str, *arguments: str) -> float:
    """Run one CLI command; its wall seconds. A failure stops the benchmark with the command's output."""
    start = time.perf_counter()
    done = subprocess.run([executable, *arguments], env=cli_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tributary {' '.join(arguments)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start


def scores_through_cli(
    setting: Setting, work: Path, executable: str, fit_rows: int | None, window: int, fit: str = "exact"
) -> tuple[np.ndarray, dict]:
    """Index and query one setting; its (Q, N) scores and wall times. The store is removed afterwards."""
    config = job_config(setting, work, fit_rows, window, fit)
    path = work / "configs" / f"{setting.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    scores_path = work / "scores" / f"{setting.name}.npy"
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    index_seconds = tributary(executable, "index", str(path), "--overwrite", "--no-progress")
    query_seconds = tributary(
        executable, "query", str(path), "--queries", str(work / "queries.jsonl"), "--scores-out", str(scores_path)
    )
    shutil.rmtree(config["store"]["path"], ignore_errors=True)
    return np.load(scores_path), {"index_seconds": round(index_seconds, 2), "query_seconds": round(query_seconds, 2)}


def write_rows(path: Path, prefix: str, texts: tuple[str, ...]) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def prepare_workdir(task: LMTask, work: Path) -> float:
    """A fresh `work` with the training and query rows and the full-data model; the seconds the model took."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "stores").mkdir(parents=True)
    write_rows(work / "train.jsonl", "train", task.train_texts)
    write_rows(work / "queries.jsonl", "query", task.query_texts)
    start = time.perf_counter()
    save_full_model(task, work / "model", FULL_MODEL_SEED)
    return time.perf_counter() - start


def random_scores(queries: int, train: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((queries, train))


# ---- outputs ------------------------------------------------------------------------------------------


def tables(results: list[dict], exact: float, dims: list[int], kinds: list[str], methods: list[str]) -> list[list]:
    by_key = {(r["method"], r["kind"], r["dim"]): r for r in results}
    rows = []
    for method in methods:
        for kind in kinds:
            row: list = [f"{LABELS[method]} / {kind}"]
            for dim in dims:
                found = by_key.get((method, "exact" if dim == 0 else kind, dim))
                if found is None:
                    row.append("")
                    continue
                low, high = found["lds"]["ci95"]
                row.append(f"{found['lds']['mean']:.3f} [{low:.3f}, {high:.3f}] ({found['lds']['mean'] / exact:.2f}×)")
            rows.append(row)
    return rows


def plot(results: list[dict], floor: dict, kinds: list[str], methods: list[str], title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 5))
    positions = {}
    for method in methods:
        for style, kind in zip(STYLES * 4, kinds):
            points = sorted(
                (r for r in results if r["method"] == method and (r["kind"] == kind or r["kind"] == "exact")),
                key=lambda r: r["dim"],
            )
            points = [p for p in points if p["dim"] != 0] + [p for p in points if p["dim"] == 0]
            if not points:
                continue
            xs = [p["dim"] if p["dim"] else 128 for p in points]
            positions.update({x: ("exact" if p["dim"] == 0 else str(p["dim"])) for x, p in zip(xs, points)})
            mean = np.array([p["lds"]["mean"] for p in points])
            low = np.array([p["lds"]["ci95"][0] for p in points])
            high = np.array([p["lds"]["ci95"][1] for p in points])
            axis.plot(xs, mean, style, marker="o", color=COLOURS[method], label=f"{LABELS[method]} / {kind}")
            axis.fill_between(xs, low, high, color=COLOURS[method], alpha=0.12)
    axis.axhline(floor["mean"], color="tab:gray", linestyle=":", label="random scores")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(positions), [positions[x] for x in sorted(positions)])
    axis.set(xlabel="projection dim per side (exact = dim 0)", ylabel="LDS (mean over queries, 95% bootstrap CI)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--full", action="store_true", help="M = 128 subsets × R = 3 seeds (its own cache path)")
    parser.add_argument("--subsets", type=positive_int, default=None, help="M (default 64; --full 128)")
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="R retraining seeds per subset (default 2; --full 3)"
    )
    parser.add_argument("--train", type=positive_int, default=256, help="N training rows")
    parser.add_argument("--queries", type=positive_int, default=32, help="Q held-out query rows")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="retraining processes (0: in this process)")
    parser.add_argument("--kinds", default="rademacher", help="comma-separated projection.kind values")
    parser.add_argument(
        "--fit-rows", type=positive_int, default=None, help="projection.fit_rows for data-dependent kinds"
    )
    parser.add_argument("--fit", choices=("exact", "sketch"), default="exact", help="projection.fit for fitted kinds")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--dims", default="0,8,16,32,64", help="comma-separated projection dims per side")
    parser.add_argument("--cache", default=None, help=f"ground-truth Zarr (default {CACHE.relative_to(REPOSITORY)})")
    parser.add_argument("--workdir", default="/tmp/tributary-lm-lds", help="model, rows, configs, stores, scores")
    parser.add_argument("--tributary", default=CLI, help="the CLI executable")
    parser.add_argument("--name", default="lm_lds", help="results file stem under benchmarks/results")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    subsets = args.subsets or (128 if args.full else 64)
    seeds = args.seeds or (3 if args.full else 2)
    cache = Path(args.cache) if args.cache else (CACHE if not args.full else RESULTS / "lm_lds_truth_full.zarr")
    kinds = [k for k in args.kinds.split(",") if k]
    methods = [m for m in args.methods.split(",") if m]
    dims = sorted(int(d) for d in args.dims.split(","))
    task = build_task(TaskSpec(train=args.train, queries=args.queries))
    truth, truth_timing = ground_truth(task, 0.5, subsets, seeds, args.workers, cache)
    print("ground truth", truth_timing, flush=True)

    work = Path(args.workdir)
    full_model_seconds = prepare_workdir(task, work)

    results = []
    for setting in settings(methods, kinds, dims):
        scores, timing = scores_through_cli(setting, work, args.tributary, args.fit_rows, task.spec.window, args.fit)
        result = {"method": setting.method, "kind": setting.kind, "dim": setting.dim, "lds": lds(scores, truth)}
        results.append(result | timing)
        print(setting.name, f"{result['lds']['mean']:.3f}", timing, flush=True)
    floor = lds(random_scores(len(task.query_texts), len(task.train_texts)), truth)
    exact = next((r["lds"]["mean"] for r in results if r["method"] == "ekfac" and r["dim"] == 0), float("nan"))
    for result in results:
        result["fraction_of_exact_ekfac"] = result["lds"]["mean"] / exact

    write_result(
        args.name,
        {
            "task": task.summary(),
            "alpha": 0.5,
            "subsets": subsets,
            "seeds": seeds,
            "ground_truth": truth_timing
            | {"cache": str(cache.relative_to(REPOSITORY) if cache.is_relative_to(REPOSITORY) else cache)},
            "full_model_seconds": round(full_model_seconds, 2),
            "fit_rows": args.fit_rows,
            "fit": args.fit,
            "exact_ekfac_lds": exact,
            "random_scores": floor,
            "results": results,
        },
    )
    title = (
        f"{task.name}: GPT-2 {task.spec.architecture.layers}×{task.spec.architecture.hidden}, "
        f"N={len(task.train_texts)}, Q={len(task.query_texts)}, {subsets} half-subsets × {seeds} seeds"
    )
    plot(results, floor, kinds, methods, title, RESULTS / f"{args.name}.png")
    header = ["method / kind"] + ["exact (dim 0)" if d == 0 else f"dim {d}" for d in dims]
    text = markdown_table(header, tables(results, exact, dims, kinds, methods), RESULTS / f"{args.name}.md")
    text += f"\nrandom scores: {floor['mean']:.3f} [{floor['ci95'][0]:.3f}, {floor['ci95'][1]:.3f}]\n"
    (RESULTS / f"{args.name}.md").write_text(f"{title}\n\n{text}")
    print(text)
    print(machine_line())


if __name__ == "__main__":
    main()
