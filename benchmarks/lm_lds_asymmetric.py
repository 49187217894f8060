"""The asymmetric form on the LM LDS task: does preconditioning the query at full width, then projecting it, raise
the store's LDS and recall over the symmetric projection at the same numbers per module? (issues 29, 30)

On the task, truth cache and exact EK-FAC of `benchmarks/lm_lds_oracle.py` (GPT-2 2×128, 256 Hamlet windows, 32
queries; exact EK-FAC = the dim-0 store, λ = 0.1 × mean Λ), every variant is compared with exact EK-FAC by LDS
(fraction of exact, paired bootstrap CI over queries) and by how well it finds exact's top rows: top-10 overlap,
recall of the exact top-10 within its top-K, Spearman.

  store-symmetric  the rademacher store at dim 16 / 64 (256 / 4096 numbers per module) through `tributary index`
                   and `tributary query`: both sides projected, EK-FAC fitted in the projected space
  store-asymmetric the same store's rows, scored against the query preconditioned at full width with exact
                   EK-FAC's factors and then projected by the store's own matrices:
                   Σ_m ⟨P_outᵀ (H + λ)⁻¹ G_q P_in, P_outᵀ G_n P_in⟩ (what a store with `exact: {factors: true}`
                   can score without the exact pass)
  jl / asym_jl     the oracle's dense Gaussian sketches (lm_lds_oracle.py): of the whitened gradient on both sides,
                   and of the raw rows against the preconditioned query; mean over its seeds

It also runs `tributary query --exact` on the dim-16 store (indexed with `exact: {factors: true}`) and compares its
scores and LDS with the dim-0 store's (issue 29: the LM LDS benchmark's `--exact` equals dim 0's LDS), and checks
that the dim-16 store's rows are P_outᵀ G_n P_in of the dim-0 store's rows. No held-out fit store is made.

    python -m benchmarks.lm_lds_asymmetric     # a few minutes on 2 idle cores; results/lm_lds_asymmetric.{json,md}
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import first_line, mean_spearman, top_overlap, write_result
from benchmarks.evaluation_common import RESULTS, machine_line
from benchmarks.lm_lds import CACHE, CLI, Setting, ground_truth, job_config, prepare_workdir, tributary
from benchmarks.lm_lds_oracle import (
    BUDGETS,
    JL_SEEDS,
    Module,
    Reference,
    damping_of,
    exact_scores,
    index_stores,
    load_modules,
    module_scores,
)
from benchmarks.lm_lds_task import TaskSpec, build_task
from engine.evaluation.lds import lds
from engine.store import GradientStore

DIMS = (16, 64)  # store projection dim per side: 256 and 4096 numbers per module on this model
DAMPING = 0.1  # × mean Λ, Tributary's default
CUTOFFS = (10, 25, 50, 100)  # of N = 256 rows
ORACLE_METHODS = ("jl", "asym_jl")


def best(scores: np.ndarray, k: int) -> np.ndarray:
    """Each query's k highest-scoring rows, best first, ties to the lower row (the store's order)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def finding(scores: np.ndarray, exact: np.ndarray) -> dict:
    """How well `scores` find exact EK-FAC's top-10: overlap, recall within the top-K, Spearman (means over queries)."""
    truth = best(exact, 10)
    out = {"top10_overlap": top_overlap(best(scores, 10), truth)}
    for k in CUTOFFS:
        found = best(scores, k)
        out[f"recall_top10_in_top{k}"] = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    out["spearman"] = mean_spearman(scores, exact)
    return out


def store_config(work: Path, dim: int, window: int) -> Path:
    config = job_config(Setting("ekfac", "rademacher", dim), work, None, window)
    if dim == DIMS[0]:
        config["exact"] = {"factors": True}  # full-width factors beside the rows, for `query --exact`
    path = work / f"dim{dim}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def side(spec, module, which: str) -> np.ndarray:
    matrix = spec.side_matrix(module, which, torch.float64)
    return np.eye(module.d_in if which == "in" else module.d_out) if matrix is None else matrix.numpy()


def asymmetric_store_scores(modules: list[Module], store: GradientStore) -> tuple[np.ndarray, float]:
    """The store's rows against the queries preconditioned at full width, then projected by the store's matrices;
    and the largest relative difference between the stored rows and P_outᵀ G_n P_in of the dim-0 rows."""
    spec = store.manifest.projection
    stored = store.read_rows(0, store.rows).astype(np.float64)
    by_name = {m.name: m for m in modules}
    scores = np.zeros((len(modules[0].queries), len(modules[0].train)))
    worst = 0.0
    for module in store.modules:
        m = by_name[module.name]
        p_in, p_out = side(spec, module, "in"), side(spec, module, "out")
        rows = stored[:, module.offset : module.offset + module.width]
        whitened = (m.queries / (m.lam + damping_of(m.lam, DAMPING))).reshape(-1, *m.shape)
        query = p_out.T @ (m.q_s @ whitened @ m.q_a.T) @ p_in  # P_outᵀ (H + λ)⁻¹ G_q P_in
        scores += query.reshape(len(query), -1) @ rows.T
        projected = p_out.T @ (m.q_s @ m.train.reshape(-1, *m.shape) @ m.q_a.T) @ p_in
        worst = max(worst, float(np.abs(projected.reshape(len(rows), -1) - rows).max() / np.abs(rows).max()))
    return scores, worst


def noise_ratio(modules: list[Module]) -> dict:
    """Why the asymmetric sketch is noisier at equal k. A Gaussian sketch's ⟨Rx, Ry⟩ has variance
    (‖x‖²‖y‖² + ⟨x, y⟩²)/k, summed over modules; both forms estimate the same ⟨x, y⟩, with x, y = z_q, z_n
    (symmetric, whitened) or (H + λ)⁻¹ g_q, g_n (asymmetric). Per (query, row): √(Σ_m ‖x‖²‖y‖²) of the asymmetric
    form over the symmetric one's (rotation-invariant, so in the eigenbasis)."""
    symmetric = np.zeros((len(modules[0].queries), len(modules[0].train)))
    asymmetric = np.zeros_like(symmetric)
    for m in modules:
        shifted = m.lam + damping_of(m.lam, DAMPING)
        symmetric += np.outer((m.queries**2 / shifted).sum(axis=1), (m.train**2 / shifted).sum(axis=1))
        asymmetric += np.outer((m.queries**2 / shifted**2).sum(axis=1), (m.train**2).sum(axis=1))
    ratio = np.sqrt(asymmetric / symmetric)
    return {"median": float(np.median(ratio)), "quartiles": [float(np.quantile(ratio, q)) for q in (0.25, 0.75)]}


def oracle_rows(modules: list[Module], reference: Reference, exact: np.ndarray) -> list[dict]:
    totals: dict[tuple[str, int, int], np.ndarray] = {}
    for m in modules:
        for key, scores in module_scores(m, DAMPING, ORACLE_METHODS).items():
            totals[key] = totals[key] + scores if key in totals else scores
    rows = []
    for name in ORACLE_METHODS:
        for k in BUDGETS:
            runs = [reference.compare(totals[name, k, s]) | finding(totals[name, k, s], exact) for s in range(JL_SEEDS)]
            row: dict = {"variant": name, "numbers_per_module": k, "seeds": JL_SEEDS}
            for field in runs[0]:
                if field != "fraction_ci95":
                    row[field] = float(np.mean([r[field] for r in runs]))
            row["fraction_ci95"] = runs[0]["fraction_ci95"]  # of the first seed
            row["lds_seed_std"] = float(np.std([r["lds"] for r in runs]))
            rows.append(row)
    return rows


def markdown(payload: dict) -> str:
    exact = payload["exact_lds"]
    lines = [payload["title"], "", f"exact EK-FAC (dim-0 store, λ = 0.1 × mean Λ): LDS {exact:.3f}", ""]
    check = payload["exact_pass"]
    lines += [
        f"`tributary query --exact` on the dim-16 store: LDS {check['lds']:.6f} against dim 0's {check['dim0_lds']:.6f}"
        f" (max relative score difference {check['max_relative_difference']:.1e})",
        "",
    ]
    header = ["variant", "numbers/module", "LDS (× exact) [CI]", "ρ", "top-10 overlap"]
    header += [f"recall@{k}" for k in CUTOFFS] + ["Spearman"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in payload["store"] + payload["oracle"]:
        low, high = r["fraction_ci95"]
        cells = [
            r["variant"],
            str(r["numbers_per_module"]),
            f"{r['lds']:.3f} ({r['fraction']:.2f}×) [{low:.2f}, {high:.2f}]",
            f"{r['prediction_correlation']:.2f}",
            f"{r['top10_overlap']:.2f}",
        ]
        cells += [f"{r[f'recall_top10_in_top{k}']:.2f}" for k in CUTOFFS] + [f"{r['spearman']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"stored rows = P_outᵀ G P_in of the dim-0 rows: {payload['row_check']}", ""]
    noise = payload["noise_ratio_asymmetric_over_symmetric"]
    lines += [
        "A Gaussian sketch's noise on each (query, row) score, asymmetric over symmetric at equal k (median "
        f"{noise['median']:.1f}, quartiles {noise['quartiles'][0]:.1f}-{noise['quartiles'][1]:.1f})",
        "",
    ]
    lines += [f"load average before {payload['load_before']}, after {payload['load_after']}", "", machine_line(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--workdir", default="/tmp/tributary-lm-lds-asymmetric", help="model, rows, configs, stores")
    parser.add_argument("--name", default="lm_lds_asymmetric", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    task = build_task(TaskSpec(train=256, queries=32))
    truth, _ = ground_truth(task, 0.5, 64, 2, 0, CACHE)  # the cached truth of benchmarks/lm_lds.py (refused if stale)
    work = Path(args.workdir)
    prepare_workdir(task, work)
    paths = index_stores(task, work, with_fit=False)
    queries = str(work / "queries.jsonl")
    seconds: dict[str, float] = {}
    store_scores = {}
    for dim in DIMS:
        config = store_config(work, dim, task.spec.window)
        seconds[f"index_dim{dim}"] = tributary(CLI, "index", str(config), "--overwrite", "--no-progress")
        out = work / f"dim{dim}.npy"
        seconds[f"query_dim{dim}"] = tributary(
            CLI, "query", str(config), "--queries", queries, "--scores-out", str(out)
        )
        store_scores[dim] = np.load(out)
    exact_out = work / "exact_dim16.npy"
    seconds["query_exact_dim16"] = tributary(
        CLI, "query", str(work / "dim16.yaml"), "--queries", queries, "--exact", "--scores-out", str(exact_out)
    )
    modules = load_modules(paths)
    print(f"stores ready ({time.perf_counter() - start:.0f} s)", flush=True)

    exact = exact_scores(modules, DAMPING)
    reference = Reference.of(exact, truth)
    dim0 = np.load(paths["cli_scores"])
    streamed = np.load(exact_out)
    exact_pass = {
        "lds": lds(streamed, truth)["mean"],
        "dim0_lds": lds(dim0, truth)["mean"],
        "max_relative_difference": float(np.abs(streamed - dim0).max() / np.abs(dim0).max()),
        "oracle_vs_dim0_max_relative_difference": float(np.abs(exact - dim0).max() / np.abs(dim0).max()),
    }
    print("exact pass", exact_pass, flush=True)

    store_rows, row_check = [], {}
    for dim in DIMS:
        store = GradientStore.open(str(work / "stores" / f"ekfac-rademacher-{dim}.zarr"))
        asymmetric, worst = asymmetric_store_scores(modules, store)
        row_check[f"dim{dim}_max_relative_difference"] = worst
        numbers = store.modules[0].width
        for name, scores in (("store-symmetric", store_scores[dim]), ("store-asymmetric", asymmetric)):
            row = {"variant": name, "dim": dim, "numbers_per_module": numbers}
            store_rows.append(row | reference.compare(scores) | finding(scores, exact))
    oracle = oracle_rows(modules, reference, exact)
    payload = {
        "title": (
            f"{task.name}: the asymmetric form against the symmetric projection, GPT-2 2×128, "
            f"N={len(task.train_texts)}, Q={len(task.query_texts)}, 64 half-subsets × 2 seeds"
        ),
        "task": task.summary(),
        "exact_lds": lds(exact, truth)["mean"],
        "exact_pass": exact_pass,
        "row_check": row_check,
        "store": store_rows,
        "oracle": oracle,
        "noise_ratio_asymmetric_over_symmetric": noise_ratio(modules),
        "cli_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    write_result(args.name, payload)
    text = markdown(payload)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
