"""Exact EK-FAC without full-width rows (`exact.factors` + `tributary query --exact` / `--rescore K`) side by
side with kronfluence's EK-FAC and a bare forward+backward, on a reduced workload by default (issue 13's with
--issue13: about 20x the work, more than 10 minutes on a loaded 2-core machine).

Reduced workload: a GPT-2-like model of 2 layers, 64 wide (vocabulary of the corpus), 128 rows x 64 tokens,
8 queries, batch 8, float32, true Fisher on both sides (their sampled labels come from different generators, so
the exact scores are compared by rank correlation; tests/exact/test_exact_kronfluence.py shows equality with the
empirical Fisher).

Each side runs in a process of its own (python -m benchmarks.peak_memory), one after the other, so that its
peak RSS (VmHWM) is its own; the bare pass and the store/rescore rows run in this process after them.

  bare            forward + loss.backward() over the rows
  kronfluence     fit_all_factors (covariances, eigendecomposition, Λ) + compute_pairwise_scores (heuristic damping)
  index           `tributary index` at projection dim 16 with exact.factors (wall time, model load included):
                  pass 1 (dim-16 rows, their covariances and the full-width covariances, one capture at full
                  width projected in the pass), the store's Λ (from its rows), then the full-width Λ pass
  exact           `query --exact`, the first batch of queries (query gradients + one pass over the rows)
  exact again     the same query again (the factors reused): the cost of a further batch, measured twice
                  alternating with a bare pass in the same process; its ratio is the faster of each
  rescore K       `query --rescore K`: the store's top/bottom K, re-scored exactly
  store           the dim-16 store's own query

Breakdown per pass: ours (pass 1 from the manifest's pass1_s; the eigendecomposition, the full-width Λ pass,
the query gradients, their preconditioning and the scoring pass timed by wrapping the functions that run them),
kronfluence's (its covariance, eigendecomposition and Λ stages, and its scores), and a cProfile of a third exact
batch, untimed (the top functions by own time). The load average (uptime) before and after is recorded.
Rows written: the bytes of the store's rows array against what a dim-0 store of the same rows would hold.

Usage: python -m benchmarks.exact [--result exact] [--issue13]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    bare_pass_seconds,
    first_line,
    gpt2_like,
    mean_spearman,
    print_table,
    random_corpus,
    ratio_table,
    top_overlap,
    write_jsonl,
    write_result,
)
from benchmarks.kronfluence_side import kronfluence_scores

REDUCED = {"rows": 128, "queries": 8, "sequence": 64, "batch": 8, "hidden": 64, "layers": 2}
ISSUE13 = {"rows": 512, "queries": 32, "sequence": 128, "batch": 8, "hidden": 256, "layers": 4}
RESCORE = (10, 25)
AGAIN_ROUNDS = 2


def _config(work: Path, size: dict):
    from engine.config import parse_config

    return parse_config(
        {
            "model": {"path": str(work / "model"), "dtype": "float32"},
            "data": {
                "train": str(work / "train.jsonl"),
                "max_length": size["sequence"] + 2,
                "batch_size": size["batch"],
            },
            "projection": {"dim": 16},
            "curvature": {"strategy": "ekfac"},
            "method": {"name": "if"},
            "store": {"path": str(work / "store.zarr"), "dtype": "float32"},
            "exact": {"factors": True},
        }
    )


def _timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def _clocked(clock: dict[str, float], module, name: str, label: str) -> None:
    """Wrap `module.name` so that its wall time adds to clock[label] (the per-pass breakdown)."""
    inner = getattr(module, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            clock[label] = clock.get(label, 0.0) + time.perf_counter() - started

    setattr(module, name, timed)


def _pass_clock() -> dict[str, float]:
    """Seconds per pass of our side, by wrapping the functions that run each one (pass 1, with the full-width
    covariances, is the manifest's pass1_s)."""
    import engine.exact.exact_query as exact_query
    import engine.exact.fit as fit
    import engine.exact.worker as worker

    clock: dict[str, float] = {}
    _clocked(clock, fit, "shared_basis", "eigendecomposition")
    _clocked(clock, worker, "lambda_pass", "full-width lambda pass")
    _clocked(clock, exact_query, "gradient_pass", "query gradients")
    _clocked(clock, exact_query, "exact_queries", "query preconditioning")
    _clocked(clock, exact_query, "_score", "scoring pass")
    return clock


def _ours(work: Path, size: dict) -> dict:
    """Index with exact factors, then two exact query batches; profiled, timings and scores left in `work`."""
    from engine.config import QueryOptions
    from engine.local_or_ray import run_exact, run_index

    config = _config(work, size)
    queries, options = str(work / "queries.jsonl"), QueryOptions(k=10)
    clock = _pass_clock()
    store, index_s = _timed(lambda: run_index(config, show_progress=False))
    exact, exact_s = _timed(lambda: run_exact(config, queries, options))
    first_batch = dict(clock)
    # a further batch against a bare pass, alternated in this one process: a quiet 2-core machine still moves a
    # pass by ~10% between minutes, so each is measured twice, side by side, and the faster of each kept
    again, bare = [], []
    for _ in range(AGAIN_ROUNDS):
        bare.append(bare_pass_seconds(config, size["batch"]))
        again.append(_timed(lambda: run_exact(config, queries, options))[1])
    breakdown = {
        "covariances (pass 1: dim-16 rows + full-width covariances)": (store.manifest.timings or {}).get("pass1_s"),
        **{key: round(value, 3) for key, value in first_batch.items()},
    }
    profile = cProfile.Profile()  # a third batch, untimed: where a query batch's time goes
    profile.runcall(run_exact, config, queries, options)
    np.save(work / "exact_scores.npy", exact.scores)
    stats = pstats.Stats(profile)
    entries = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:15]  # type: ignore[attr-defined]
    top = [
        {"function": f"{Path(file).name}:{line}({name})", "own_s": round(own, 2), "cumulative_s": round(cum, 2)}
        for (file, line, name), (_, _, own, cum, _) in entries
    ]
    rows_bytes = sum(a.nbytes_stored() for a in [store.group["grads"]])  # type: ignore[union-attr]
    return {
        "index_s": index_s,
        "exact_s": exact_s,
        "exact_again_s": min(again),
        "exact_again_rounds_s": [round(x, 3) for x in again],
        "bare_beside_again_s": min(bare),
        "bare_beside_again_rounds_s": [round(x, 3) for x in bare],
        "index_timings": store.manifest.timings,
        "rows_bytes_stored": int(rows_bytes),
        "breakdown_s": breakdown,
        "profile_top_own_time": top,
    }


def _kronfluence(work: Path, size: dict) -> dict:
    stages: dict[str, float] = {}
    scores, seconds = kronfluence_scores(
        _config(work, size), str(work / "queries.jsonl"), size["batch"], work / "kronfluence", stages
    )
    np.save(work / "kronfluence_scores.npy", scores)
    return {"seconds": seconds, **stages}


def _child(side: str, work: Path, issue13: bool) -> dict:
    """One side in a process of its own; its result and peak RSS."""
    peak = work / f"{side}.peak"
    command = [sys.executable, "-m", "benchmarks.peak_memory", str(peak), "benchmarks.exact", "--side", side]
    command += ["--work", str(work)] + (["--issue13"] if issue13 else [])
    subprocess.run(command, check=True)
    result = json.loads((work / f"{side}.json").read_text())
    result["peak_rss_gib"] = round(int(peak.read_text()) / 2**30, 3)
    return result


def _prepare(work: Path, size: dict) -> None:
    texts = random_corpus(size["rows"], size["sequence"], vocabulary=2000)
    gpt2_like(
        work / "model", texts, hidden=size["hidden"], layers=size["layers"], heads=4, positions=size["sequence"] + 2
    )
    write_jsonl(work / "train.jsonl", texts)
    write_jsonl(work / "queries.jsonl", random_corpus(size["queries"], size["sequence"], vocabulary=2000, seed=1))


def _compare(work: Path, size: dict, ours: dict, theirs: dict) -> dict:
    """The bare pass, and the store's and --rescore's agreement with --exact, in this process."""
    from engine.config import QueryOptions
    from engine.local_or_ray import run_exact, run_query
    from engine.projection.fitted import full_width

    config = _config(work, size)
    queries, options = str(work / "queries.jsonl"), QueryOptions(k=10)
    exact_scores = np.load(work / "exact_scores.npy")
    reference = np.argsort(-exact_scores, axis=1)[:, :10]
    bare = bare_pass_seconds(config, size["batch"])
    stored, store_s = _timed(lambda: run_query(config, queries, 10, options=options))
    store = stored_store(config)
    rows = {
        "bare": {"seconds": bare},
        "kronfluence": {**theirs},
        "index (dim 16 + exact factors)": {"seconds": ours["index_s"], "timings": ours["index_timings"]},
        "exact": {
            "seconds": ours["exact_s"],
            "spearman_vs_kronfluence": mean_spearman(exact_scores, np.load(work / "kronfluence_scores.npy")),
        },
        "exact again": {
            "seconds": ours["exact_again_s"],
            "rounds_s": ours["exact_again_rounds_s"],
            "bare_beside_it_s": ours["bare_beside_again_rounds_s"],
            "ratio_to_bare_beside_it": round(ours["exact_again_s"] / ours["bare_beside_again_s"], 3),
        },
        "store (dim 16)": {
            "seconds": store_s,
            "top10_overlap_with_exact": top_overlap(stored.top_indices, reference),
            "spearman_vs_exact": mean_spearman(np.asarray(stored.total), exact_scores),
        },
    }
    for k in RESCORE:
        rescored, seconds = _timed(lambda k=k: run_exact(config, queries, options, rescore=k))
        rows[f"rescore {k}"] = {
            "seconds": seconds,
            "top10_overlap_with_exact": top_overlap(rescored.result.top_indices, reference),
            "rows_scored_exactly": int(rescored.exact.sum()),
        }
    ratio_table(rows, bare)
    dim0_bytes = full_width(store.manifest.projection).total_width * 4 * store.rows
    return {"rows": rows, "dim0_rows_bytes_float32": dim0_bytes}


def _uptime() -> str:
    """The machine's load average (the machine is shared: ratios, not seconds, carry between runs)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _load_note(uptime: str) -> str:
    """Whether the run started quiet (1-minute load average under 1.5 on the 2 cores) or beside other work."""
    load = float(uptime.split("load average:")[1].split(",")[0])
    if load < 1.5:
        return f"quiet: load average {load} at the start; ratios are measured within this one run"
    return f"loaded: load average {load} at the start (shared cores); ratios are measured within this one run"


def stored_store(config):
    from engine.store import GradientStore

    return GradientStore.open(config.store.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--result", default="exact", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--issue13", action="store_true", help="issue 13's workload instead of the reduced one")
    parser.add_argument("--side", choices=("ours", "kronfluence"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    size = ISSUE13 if args.issue13 else REDUCED
    torch.manual_seed(0)
    if args.side is not None:
        work = Path(args.work)
        result = _ours(work, size) if args.side == "ours" else _kronfluence(work, size)
        (work / f"{args.side}.json").write_text(json.dumps(result, default=str))
        return
    work = Path(tempfile.mkdtemp(prefix="tributary-exact-"))
    load_before = _uptime()
    try:
        _prepare(work, size)
        theirs = _child("kronfluence", work, args.issue13)
        ours = _child("ours", work, args.issue13)
        compared = _compare(work, size, ours, theirs)
        first = (ours["index_s"] + ours["exact_s"]) / theirs["seconds"]
        summary = {
            "index_plus_first_exact_over_kronfluence": round(first, 3),
            "exact_again_over_bare": round(ours["exact_again_s"] / ours["bare_beside_again_s"], 3),
            "peak_rss_gib": {"ours": ours["peak_rss_gib"], "kronfluence": theirs["peak_rss_gib"]},
            "rows_bytes_stored": {
                "dim16_store": ours["rows_bytes_stored"],
                "dim0": compared["dim0_rows_bytes_float32"],
            },
        }
        print(f"{size}: {json.dumps(summary)}")
        print(f"breakdown (s): ours {json.dumps(ours['breakdown_s'])}; kronfluence {json.dumps(theirs)}")
        print_table(compared["rows"])
        path = write_result(
            args.result,
            {
                **size,
                **summary,
                "machine_note": _load_note(load_before),
                "results": compared["rows"],
                "breakdown_s": {"ours (index + first batch)": ours["breakdown_s"], "kronfluence": theirs},
                "uptime": {"before": load_before, "after": _uptime()},
                "profile_top_own_time": ours["profile_top_own_time"],
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
