"""Index throughput against a bare forward+backward of the same model and batches, side by side.

A GPT-2-like model of about 10M parameters, sequence length 128, on this machine. Measured in one
run, alternating the variants round by round so drift in machine speed hits all of them alike:

  bare          forward + loss.backward() (weight gradients materialised), no optimizer step
  gradients@k   `tributary index` with curvature `identity`: per-example projected gradients at
                projection dim k, written to the Zarr store (the pass every strategy shares)
  ekfac@16      the full index with EK-FAC and the true Fisher (pass 1 with a second backward for
                sampled labels, eigendecomposition, pass 2 for the corrected eigenvalues)

Index times are the passes over the data as recorded in the store's manifest; the one-off set-up
(model load, tokenising, fingerprints) is reported separately.

Usage: python benchmarks/index_throughput.py [--rows 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import first_line, gpt2_like, random_corpus, side_by_side, write_jsonl, write_result
from engine.capture.loss import per_example_loss
from engine.config import parse_config
from engine.data.batching import batches
from engine.gradients.context import prepare_index_job
from engine.runner import run_index

SEQUENCE = 128
BATCH = 8


def bare_forward_backward(model, tokenized, pad_id: int) -> float:
    model.requires_grad_(True)
    started = time.perf_counter()
    for batch in batches(tokenized, BATCH, pad_id):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        per_example_loss(logits, batch.labels).sum().backward()
        model.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    model.requires_grad_(False)
    return elapsed


def index_seconds(raw: dict) -> float:
    """Seconds of the passes over the data (model loading, tokenising and fingerprinting excluded)."""
    timings = run_index(parse_config(raw), overwrite=True, show_progress=False).manifest.timings or {}
    return timings["total_s"] - timings["setup_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="tributary-bench-"))
    try:
        texts = random_corpus(args.rows, SEQUENCE, vocabulary=8000)
        model_dir = gpt2_like(
            work / "model", texts, hidden=args.hidden, layers=args.layers, heads=4, positions=SEQUENCE
        )
        train = write_jsonl(work / "train.jsonl", texts)

        def config(dim: int, strategy: str) -> dict:
            return {
                "model": {"path": str(model_dir)},
                "data": {"train": str(train), "max_length": SEQUENCE, "batch_size": BATCH},
                "projection": {"dim": dim},
                "curvature": {"strategy": strategy},
                "store": {"path": str(work / f"store-{dim}-{strategy}.zarr")},
            }

        job = prepare_index_job(parse_config(config(16, "identity")))
        parameters = sum(p.numel() for p in job.context.model.parameters())
        tokens = sum(len(row.input_ids) for row in job.tokenized)
        variants = {"bare": lambda: bare_forward_backward(job.context.model, job.tokenized, job.context.pad_id)}
        for dim in (0, 16, 64):
            variants[f"gradients@{dim}"] = lambda d=dim: index_seconds(config(d, "identity"))
        variants["ekfac@16"] = lambda: index_seconds(config(16, "ekfac"))
        times = side_by_side(variants, args.rounds)
        bare = statistics.median(times["bare"])
        table = {}
        for name, samples in times.items():
            seconds = statistics.median(samples)
            table[name] = {
                "seconds_median": round(seconds, 4),
                "examples_per_s": round(args.rows / seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "ratio_to_bare": round(bare / seconds, 3),
                "samples": [round(s, 4) for s in samples],
            }
        print(f"model: {parameters / 1e6:.1f}M parameters, {args.rows} rows x {SEQUENCE} tokens, batch {BATCH}")
        print(f"{'variant':<14}{'examples/s':>12}{'tokens/s':>12}{'ratio to bare':>15}")
        for name, row in table.items():
            print(f"{name:<14}{row['examples_per_s']:>12}{row['tokens_per_s']:>12}{row['ratio_to_bare']:>15}")
        path = write_result(
            "index_throughput",
            {
                "parameters": parameters,
                "rows": args.rows,
                "sequence": SEQUENCE,
                "batch": BATCH,
                "rounds": args.rounds,
                "results": table,
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
