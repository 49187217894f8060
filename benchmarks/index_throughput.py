"""EK-FAC index + query against a bare forward+backward and kronfluence, side by side, with peak memory.

Workload (issue 13's): a GPT-2-like model of 4 layers, 256 wide, 4000 words (about 4.2M parameters; 16 tracked
block modules), 512 rows x 128 tokens, 32 queries, batch 8, float32 model and store. `--small` (96 rows, 8
queries) is a quick check of the whole benchmark, not a figure.

Every variant runs in its own process, so its peak RSS is its own (VmHWM, benchmarks/peak_memory.py):

  bare                 forward + loss.backward() over the rows (weight gradients materialised), no optimizer
  ekfac@16 true        `tributary index` (EK-FAC, true Fisher, projection dim 16: one pass, Λ read from the store)
                       then the query (method if)
  ekfac@16 two-pass    the same with curvature.lambdas: model (the index before issue 13: Λ from a second pass)
  ekfac@16 empirical   fisher: empirical (Λ from the stored rows themselves)
  grad_dot@16          curvature identity, method grad_dot
  ekfac@16 kfac_eigen  projection.kind kfac_eigen (issue 14): a fitting pass over every row before pass 1
  ekfac@16 kfac_eigen fit128   the same, fitted on 128 of the 512 rows (projection.fit_rows: 128)
  ekfac@16 kfac_eigen sketch   projection.fit: sketch (each side's eigenvectors from a one-pass Nyström sketch
                       of width 64 instead of the d x d covariance); "sketch fit128" on 128 rows
  ekfac@0 true         exact EK-FAC (projection dim 0), local store, default chunking (shards sized so that their
                       partial sums are a quarter of their rows: 40 rows here); auto takes Λ from a second model
                       pass there (tokens rotated into the eigenbasis)
  ekfac@0 store        the same with curvature.lambdas: store (pass 1 writes fisher_grads, Λ reads them back)
  ekfac@0 chunk8       ekfac@0 true with store.rows_per_chunk 8, one batch a shard (the default before shards were
                       sized against their partial sums: each shard writes ~122 MB of full-width covariance and Λ
                       sums, as much as its 8 rows; the default now is 40 rows a shard here)
  kronfluence          kronfluence's EK-FAC (true Fisher, float32, heuristic damping): factors + pairwise scores

compute = the index's passes (the manifest's total − setup: model load, tokenising, fingerprints excluded) plus the
query (`run_query` wall time, model load included); kronfluence: fit_all_factors + compute_pairwise_scores.
`ratio_to_bare` is compute / bare (lower is better). For the fitted kinds, `projection_s` is the fitting pass alone
and `fit_vs_bare_rows` is it over the bare pass's time scaled to the fitted rows (issue 14: at most 1). Spearman: the mean over queries of the rank correlation
over training rows with kronfluence's scores (exact EK-FAC; its labels are sampled with another generator than
Tributary's, so even exact Tributary scores are not 1). Peak RSS of a Tributary variant is that of
`tributary index` alone.

Usage: python -m benchmarks.index_throughput [--small] [--rounds 1] [--skip-exact] [--only NAME,NAME] [--result NAME]

The README's figures come from `--rounds 2` (every variant, results/index_throughput.json), and the exact rows
from `--only "ekfac@0 true,ekfac@0 chunk8,ekfac@0 store" --result index_throughput_exact`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import (
    bare_pass_seconds,
    first_line,
    gpt2_like,
    mean_spearman,
    positive_int,
    random_corpus,
    write_jsonl,
    write_result,
)

SEQUENCE = 128
BATCH = 8
ROOT = Path(__file__).resolve().parents[1]

TRIBUTARY = {  # name: (projection dim, strategy, fisher, lambdas, method)
    "ekfac@16 true": (16, "ekfac", True, "auto", "if"),
    "ekfac@16 two-pass": (16, "ekfac", True, "model", "if"),
    "ekfac@16 empirical": (16, "ekfac", "empirical", "auto", "if"),
    "ekfac@16 kfac_eigen": (16, "ekfac", True, "auto", "if"),
    "ekfac@16 kfac_eigen fit128": (16, "ekfac", True, "auto", "if"),
    "ekfac@16 kfac_eigen sketch": (16, "ekfac", True, "auto", "if"),
    "ekfac@16 kfac_eigen sketch fit128": (16, "ekfac", True, "auto", "if"),
    "grad_dot@16": (16, "identity", True, "auto", "grad_dot"),
    "ekfac@0 true": (0, "ekfac", True, "auto", "if"),
    "ekfac@0 store": (0, "ekfac", True, "store", "if"),
    "ekfac@0 chunk8": (0, "ekfac", True, "auto", "if"),
}
STORE = {"ekfac@0 chunk8": {"rows_per_chunk": 8}}  # shards of one batch, the default chunking before
FITTED = {
    "ekfac@16 kfac_eigen": {"kind": "kfac_eigen"},
    "ekfac@16 kfac_eigen fit128": {"kind": "kfac_eigen", "fit_rows": 128},
    "ekfac@16 kfac_eigen sketch": {"kind": "kfac_eigen", "fit": "sketch"},
    "ekfac@16 kfac_eigen sketch fit128": {"kind": "kfac_eigen", "fit": "sketch", "fit_rows": 128},
}


def _config(work: Path, name: str, model: Path, train: Path) -> dict:
    dim, strategy, fisher, lambdas, method = TRIBUTARY[name]
    store: dict = {"path": str(work / (name.replace(" ", "_").replace("@", "") + ".zarr")), **STORE.get(name, {})}
    projection = {"dim": dim, **FITTED.get(name, {})}
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(train), "max_length": SEQUENCE, "batch_size": BATCH},
        "projection": projection,
        "curvature": {"strategy": strategy, "fisher": fisher, "lambdas": lambdas},
        "method": {"name": method},
        "store": store,
    }


def _child(module_args: list[str]) -> tuple[int, float, int]:
    """Run `python -m MODULE ARGS` in a fresh process; (exit status, wall seconds, its own peak RSS in bytes:
    VmHWM through benchmarks.peak_memory, as ru_maxrss would carry over this process's size)."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        started = time.perf_counter()
        command = [sys.executable, "-m", "benchmarks.peak_memory", peak.name, *module_args]
        status = subprocess.run(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL).returncode
        seconds = time.perf_counter() - started
        text = Path(peak.name).read_text()
    return status, seconds, int(text) if text else 0


def _tributary(work: Path, name: str, model: Path, train: Path, queries: Path) -> dict:
    from engine.config import parse_config
    from engine.local_or_ray import run_query
    from engine.store import GradientStore

    raw = _config(work, name, model, train)
    shutil.rmtree(raw["store"]["path"], ignore_errors=True)
    config_path = work / "job.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    status, _, rss = _child(["engine.cli", "index", str(config_path), "--no-progress"])
    if status != 0:
        raise RuntimeError(f"tributary index failed for {name} (exit {status})")
    timings = GradientStore.open(raw["store"]["path"]).manifest.timings or {}
    index = timings["total_s"] - timings["setup_s"]
    scores_path = work / "scores.npy"
    started = time.perf_counter()
    run_query(parse_config(raw), str(queries), k=1, scores_out=str(scores_path))
    query = time.perf_counter() - started
    scores = np.load(scores_path)
    shutil.rmtree(raw["store"]["path"], ignore_errors=True)
    passes = {key: timings[key] for key in PASS_KEYS if key in timings}
    return {"seconds": index + query, "index_s": index, "query_s": query, "rss": rss, "scores": scores, **passes}


PASS_KEYS = ("projection_s", "pass1_s", "pass2_s")


def _fitted_rows(name: str, rows: int) -> int:
    """How many rows the fitting pass reads: every ⌈N/fit_rows⌉-th (engine.projection.fitted.fit_row_positions)."""
    from engine.projection.fitted import fit_row_positions

    return len(fit_row_positions(rows, FITTED[name].get("fit_rows"), 0, rows))


def _in_child(kind: str, spec: Path) -> None:
    """The body of a measured child process: `bare` or `kronfluence`; writes its seconds (and scores) next to spec."""
    from engine.config import parse_config

    settings = json.loads(spec.read_text())
    config = parse_config(settings["config"])
    if kind == "bare":
        seconds = bare_pass_seconds(config, BATCH)
    else:
        from benchmarks.kronfluence_side import kronfluence_scores

        scores, seconds = kronfluence_scores(config, settings["queries"], BATCH, spec.parent / "kronfluence")
        np.save(spec.with_suffix(".npy"), scores)
    spec.with_suffix(".out").write_text(json.dumps({"seconds": seconds}))


def _measured_child(kind: str, work: Path, raw: dict, queries: Path) -> dict:
    spec = work / f"{kind}.json"
    spec.write_text(json.dumps({"config": raw, "queries": str(queries)}))
    status, _, rss = _child(["benchmarks.index_throughput", "--child", kind, str(spec)])
    if status != 0:
        raise RuntimeError(f"the {kind} child failed (exit {status})")
    out = {"seconds": json.loads(spec.with_suffix(".out").read_text())["seconds"], "rss": rss}
    if kind == "kronfluence":
        out["scores"] = np.load(spec.with_suffix(".npy"))
        shutil.rmtree(work / "kronfluence", ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--small", action="store_true", help="96 rows, 8 queries: a check, not a figure")
    parser.add_argument("--rounds", type=positive_int, default=1, help="rounds of every variant, alternated")
    parser.add_argument("--skip-exact", action="store_true", help="leave out ekfac@0 (dim 0 writes full rows)")
    parser.add_argument("--only", help="comma-separated Tributary variants to run (bare and kronfluence always run)")
    parser.add_argument(
        "--result", help="name of the JSON under benchmarks/results/ (default index_throughput, _small with --small)"
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _in_child(args.child[0], Path(args.child[1]))
        return
    logging.disable(logging.INFO)
    rows, query_count = (96, 8) if args.small else (512, 32)
    work = Path(tempfile.mkdtemp(prefix="tributary-bench-"))
    try:
        texts = random_corpus(rows, SEQUENCE, vocabulary=4000)
        model = gpt2_like(work / "model", texts, hidden=256, layers=4, heads=4, positions=SEQUENCE)
        train = write_jsonl(work / "train.jsonl", texts)
        queries = write_jsonl(work / "queries.jsonl", random_corpus(query_count, SEQUENCE, vocabulary=4000, seed=1))
        base = _config(work, "ekfac@16 true", model, train)
        names = [name for name in TRIBUTARY if not (args.skip_exact and name.startswith("ekfac@0"))]
        if args.only:
            wanted = [name.strip() for name in args.only.split(",")]
            unknown = sorted(set(wanted) - set(TRIBUTARY))
            if unknown:
                parser.error(f"--only: unknown variants {unknown}; choose from {sorted(TRIBUTARY)}")
            names = [name for name in names if name in wanted]
        samples: dict[str, list[dict]] = {name: [] for name in ["bare", *names, "kronfluence"]}
        for _ in range(args.rounds):
            samples["bare"].append(_measured_child("bare", work, base, queries))
            for name in names:
                samples[name].append(_tributary(work, name, model, train, queries))
            samples["kronfluence"].append(_measured_child("kronfluence", work, base, queries))
        reference = samples["kronfluence"][-1]["scores"]
        bare = statistics.median(s["seconds"] for s in samples["bare"])
        table = {}
        for name, runs in samples.items():
            seconds = statistics.median(s["seconds"] for s in runs)
            row = {
                "seconds_median": round(seconds, 3),
                "ratio_to_bare": round(seconds / bare, 3),
                "peak_rss_gb": round(max(s["rss"] for s in runs) / 1e9, 3),
                "samples": [round(s["seconds"], 3) for s in runs],
            }
            for key in ("index_s", "query_s", *PASS_KEYS):
                if key in runs[-1]:
                    row[key] = round(runs[-1][key], 3)
            if name in FITTED:
                fitted = _fitted_rows(name, rows)
                row["fit_rows"] = fitted
                row["fit_vs_bare_rows"] = round(runs[-1]["projection_s"] / (bare * fitted / rows), 3)
            if "scores" in runs[-1]:
                row["spearman_vs_exact_ekfac"] = round(mean_spearman(runs[-1]["scores"], reference), 3)
            table[name] = row
        parameters = sum(p.numel() for p in _load(model).parameters())
        print(f"model: {parameters / 1e6:.1f}M parameters, {rows} rows x {SEQUENCE} tokens, {query_count} queries")
        print(f"{'variant':<20}{'compute/bare':>14}{'peak RSS GB':>13}{'Spearman':>10}")
        for name, row in table.items():
            spearman = row.get("spearman_vs_exact_ekfac", "")
            print(f"{name:<20}{row['ratio_to_bare']:>14}{row['peak_rss_gb']:>13}{spearman!s:>10}")
        path = write_result(
            args.result or ("index_throughput_small" if args.small else "index_throughput"),
            {
                "parameters": parameters,
                "rows": rows,
                "queries": query_count,
                "sequence": SEQUENCE,
                "batch": BATCH,
                "rounds": args.rounds,
                "results": table,
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, local_files_only=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
