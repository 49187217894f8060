"""The arithmetic an exact (projection dim 0) EK-FAC index cannot skip, timed against a bare forward+backward.

Issue 13 asks for an exact EK-FAC index + query within 2x a bare forward+backward. Whatever the implementation,
an exact EK-FAC over rows of T tokens computes, for every tracked module (d_in -> d_out) and every row:

  covariance     Σ_t a aᵀ and Σ_t δ δᵀ                           2T(d_in² + d_out²) flops
  row gradient   G_n = Σ_t δ aᵀ (the stored row, exact width)      2T d_in d_out
  Λ              Σ_n (Q_Sᵀ G_n Q_A)², the cheaper of
                   per token: δ Q_S, a Q_A, then one product a row  2T(d_in² + d_out²) + 2T d_in d_out
                   per row:   Q_Sᵀ G_n Q_A from the row             2 d_in d_out (d_in + d_out)
  eigenbases     eigh of both covariances, once

against a forward+backward's 6T d_in d_out. Λ needs the eigenbases, so it takes a second look at every row
after the covariances are complete: at least a forward (a model pass), or one read of the stored rows. And an
index that a query answers from stores the rows: at least one write and one read of their bytes.

This script times exactly those on the tracked modules of issue 13's workload (the GPT-2-like model of
`benchmarks.index_throughput`, 512 rows x 128 tokens, batch 8, float32 products, float64 sums), side by side
with the bare forward+backward over the same rows, and reports each as a multiple of bare:

  arithmetic floor   bare + covariance + row gradient + Λ (the cheaper way per module) + eigh
  floor              that + the second look (the cheaper of a no-grad forward and one read of the rows' bytes)
                     + one write and one read of the rows' bytes (through the page cache, never synced)

It leaves out, in the index's favour, the true Fisher's sampled-label backward, checksums, the query's own
gradients, and all the framework around the products (each piece runs on one batch's tensors, cache-warm).
Byte rates are measured on min(rows' bytes, 1 GiB) and scaled to the rows' bytes. No implementation of exact
EK-FAC that stores its rows can be faster than the floor on this machine. Writes benchmarks/results/ekfac_floor.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    bare_pass_seconds,
    first_line,
    gpt2_like,
    positive_int,
    random_corpus,
    write_jsonl,
    write_result,
)
from benchmarks.index_throughput import BATCH, SEQUENCE, _config

GOAL = 2.0


def _tracked_shapes(config) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of every module the engine tracks at projection dim 0 (d_in counts a tracked bias)."""
    from engine.gradients.context import load_model_context

    return [(m.name, m.d_in, m.d_out) for m in load_model_context(config).spec.modules]


def _orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=generator))[0]


class FloorModule:
    """Per-token activations and output gradients of one batch, with eigenbases, for one tracked module."""

    def __init__(
        self,
        name: str,
        d_in: int,
        d_out: int,
        generator: torch.Generator,
        batch: int = BATCH,
        tokens: int = SEQUENCE,
        dtype: torch.dtype = torch.float32,
    ):
        self.name, self.d_in, self.d_out = name, d_in, d_out
        self.a = torch.randn(batch, tokens, d_in, generator=generator, dtype=dtype)
        self.delta = torch.randn(batch, tokens, d_out, generator=generator, dtype=dtype)
        self.q_a, self.q_s = _orthogonal(d_in, generator).to(dtype), _orthogonal(d_out, generator).to(dtype)

    def covariance(self, a_sum: torch.Tensor, s_sum: torch.Tensor) -> None:
        a, delta = self.a.reshape(-1, self.d_in), self.delta.reshape(-1, self.d_out)
        a_sum += (a.T @ a).double()
        s_sum += (delta.T @ delta).double()

    def row_gradients(self) -> torch.Tensor:
        return torch.bmm(self.delta.transpose(1, 2), self.a)

    def lambda_per_token(self, lam: torch.Tensor) -> None:
        rotated = torch.bmm((self.delta @ self.q_s).transpose(1, 2), self.a @ self.q_a)
        lam += rotated.square().sum(0).double()

    def lambda_per_row(self, lam: torch.Tensor, rows: torch.Tensor) -> None:
        rotated = self.q_s.T @ rows @ self.q_a
        lam += rotated.square().sum(0).double()


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _pieces(modules: list[FloorModule], batches: int) -> dict[str, dict[str, float]]:
    """Seconds per piece and module over `batches` batches (the same tensors each batch: a floor, cache-warm)."""
    times: dict[str, dict[str, float]] = {piece: {} for piece in ("covariance", "row", "lambda_token", "lambda_row")}
    for m in modules:
        for piece, seconds in _module_pieces(m, batches).items():
            times[piece][m.name] = seconds
    return times


def _module_pieces(m: FloorModule, batches: int) -> dict[str, float]:
    a_sum, s_sum = torch.zeros(m.d_in, m.d_in, dtype=torch.float64), torch.zeros(m.d_out, m.d_out, dtype=torch.float64)
    lam = torch.zeros(m.d_out, m.d_in, dtype=torch.float64)
    rows = m.row_gradients()
    return {
        "covariance": _timed(lambda: [m.covariance(a_sum, s_sum) for _ in range(batches)]),
        "row": _timed(lambda: [m.row_gradients() for _ in range(batches)]),
        "lambda_token": _timed(lambda: [m.lambda_per_token(lam) for _ in range(batches)]),
        "lambda_row": _timed(lambda: [m.lambda_per_row(lam, rows) for _ in range(batches)]),
    }


def _eigh(modules: list[FloorModule], generator: torch.Generator) -> float:
    def symmetric(size: int) -> torch.Tensor:
        x = torch.randn(size, size, dtype=torch.float64, generator=generator)
        return x @ x.T

    matrices = [symmetric(size) for m in modules for size in (m.d_in, m.d_out)]
    return _timed(lambda: [torch.linalg.eigh(matrix) for matrix in matrices])


def _forward(config) -> float:
    """A no-grad forward over the rows: the least any model pass for Λ costs."""
    from engine.data.batching import batches
    from engine.gradients.context import prepare_index_job

    job = prepare_index_job(config)
    model = job.context.model
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches(job.tokenized, BATCH, job.context.pad_id):
            model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
    return time.perf_counter() - started


SAMPLE_BYTES = 1 << 30
BLOCK_BYTES = 128 << 20


def _byte_rates(directory: Path, total: int) -> tuple[float, float]:
    """(write, read) seconds for `total` bytes of rows, scaled from min(total, 1 GiB) written in 128 MiB blocks
    to a file in `directory` and read back (the page cache's speed: nothing is synced)."""
    size = min(total, SAMPLE_BYTES)
    block = torch.randn(min(size, BLOCK_BYTES) // 4).numpy().tobytes()
    path = directory / "rows.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
    written = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(len(block))
        while handle.readinto(buffer):
            pass
    read = time.perf_counter() - started
    path.unlink()
    scale = total / (len(block) * (size // len(block)))
    return written * scale, read * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=512)
    parser.add_argument("--rounds", type=positive_int, default=2)
    args = parser.parse_args()
    from engine.config import parse_config

    work = Path(tempfile.mkdtemp(prefix="tributary-floor-"))
    try:
        texts = random_corpus(args.rows, SEQUENCE, vocabulary=4000)
        model = gpt2_like(work / "model", texts, hidden=256, layers=4, heads=4, positions=SEQUENCE)
        train = write_jsonl(work / "train.jsonl", texts)
        config = parse_config(_config(work, "ekfac@0 true", model, train))
        shapes = _tracked_shapes(config)
        generator = torch.Generator().manual_seed(0)
        modules = [FloorModule(name, d_in, d_out, generator) for name, d_in, d_out in shapes]
        batches = -(-args.rows // BATCH)
        bare_runs: list[float] = []
        piece_runs: list[dict[str, dict[str, float]]] = []
        eigh_runs: list[float] = []
        forward_runs: list[float] = []
        byte_runs: list[tuple[float, float]] = []
        row_bytes = args.rows * sum(d_in * d_out for _, d_in, d_out in shapes) * 4
        _pieces(modules, 1)  # warm-up
        for _ in range(args.rounds):
            bare_runs.append(bare_pass_seconds(config, BATCH))
            piece_runs.append(_pieces(modules, batches))
            eigh_runs.append(_eigh(modules, generator))
            forward_runs.append(_forward(config))
            byte_runs.append(_byte_rates(work, row_bytes))
        bare = statistics.median(bare_runs)

        def median(piece: str, name: str) -> float:
            return statistics.median(run[piece][name] for run in piece_runs)

        names = [m.name for m in modules]
        covariance = sum(median("covariance", n) for n in names)
        row = sum(median("row", n) for n in names)
        lam = sum(min(median("lambda_token", n), median("lambda_row", n)) for n in names)
        eigh = statistics.median(eigh_runs)
        arithmetic = bare + covariance + row + lam + eigh
        forward = statistics.median(forward_runs)
        write = statistics.median(w for w, _ in byte_runs)
        read = statistics.median(r for _, r in byte_runs)
        second_look = min(forward, read)
        floor = arithmetic + second_look + write + read
        result = {
            "workload": {
                "rows": args.rows,
                "tokens": SEQUENCE,
                "batch": BATCH,
                "modules": len(modules),
                "row_bytes": row_bytes,
            },
            "rounds": args.rounds,
            "bare_s": round(bare, 3),
            "bare_runs_s": [round(s, 3) for s in bare_runs],
            "seconds": {
                "covariance": round(covariance, 3),
                "row_gradients": round(row, 3),
                "lambda_cheaper_way": round(lam, 3),
                "lambda_per_token": round(sum(median("lambda_token", n) for n in names), 3),
                "lambda_per_row": round(sum(median("lambda_row", n) for n in names), 3),
                "eigh": round(eigh, 3),
                "forward_no_grad": round(forward, 3),
                "rows_write": round(write, 3),
                "rows_read": round(read, 3),
            },
            "ratio_to_bare": {
                "covariance": round(covariance / bare, 3),
                "row_gradients": round(row / bare, 3),
                "lambda": round(lam / bare, 3),
                "eigh": round(eigh / bare, 3),
                "arithmetic_floor": round(arithmetic / bare, 3),
                "second_look": round(second_look / bare, 3),
                "rows_write": round(write / bare, 3),
                "rows_read": round(read / bare, 3),
                "floor": round(floor / bare, 3),
            },
            "goal": GOAL,
            "modules": {m.name: {"d_in": m.d_in, "d_out": m.d_out} for m in modules},
        }
        path = write_result("ekfac_floor", result)
        print(f"bare {bare:.2f} s; floor {floor / bare:.2f}x bare (goal {GOAL}x): {result['ratio_to_bare']}")
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
