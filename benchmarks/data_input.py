"""Driver memory against row count for each input format: JSONL (read whole) and Parquet (streamed).

For 10k, 100k and 1M short rows (8 words each), a fresh child process runs what `tributary index` runs on the
driver before any model loads: every row read and tokenised (engine.indexing.inputs.validated_row_count, with
a tiny tokenizer built from config), then the dataset fingerprint. The child's own peak RSS (VmHWM; also
before it reads a row, with torch, transformers and pyarrow imported) and wall time are reported. Parquet is written with 64k-row row groups. Results:
benchmarks/results/data_input.json.

Usage: python -m benchmarks.data_input [--rows 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import first_line, random_corpus, write_result
from benchmarks.peak_memory import high_water_bytes

ROOT = Path(__file__).resolve().parent.parent
WORDS_PER_ROW = 8
VOCABULARY = 200


def _write_inputs(work: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = random_corpus(rows, WORDS_PER_ROW, VOCABULARY, seed=rows)
    jsonl = work / f"train-{rows}.jsonl"
    with open(jsonl, "w") as handle:
        for number, text in enumerate(texts):
            handle.write(json.dumps({"id": f"r{number}", "text": text}) + "\n")
    parquet = work / f"train-{rows}.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "text": texts})
    pq.write_table(table, parquet, row_group_size=65536)
    return {"jsonl": jsonl, "parquet": parquet}


def _model(work: Path) -> Path:
    from engine.testing.tiny import save_tiny

    words = [f"w{i}" for i in range(VOCABULARY)]
    return save_tiny(work / "model", "gpt2", [" ".join(words)], hidden=16, layers=1, heads=2)


def run_child(model: str, train: str) -> dict:
    """In the child: the driver's row checks and the fingerprint, timed."""
    # imported before the baseline: what every run pays whatever its rows (parse_config does not load them)
    import pyarrow.parquet  # noqa: F401
    import transformers  # noqa: F401

    from engine.config import parse_config
    from engine.data.rows import dataset_fingerprint
    from engine.indexing.inputs import validated_row_count

    config = parse_config(
        {"model": {"path": model}, "data": {"train": train, "max_length": 32}, "store": {"path": "unused.zarr"}}
    )
    before = high_water_bytes()
    started = time.perf_counter()
    rows = validated_row_count(config)
    dataset_fingerprint(train)
    return {
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_bytes": high_water_bytes(),
        "rss_before_reading_bytes": before,
    }


def _measure(model: Path, train: Path) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = train.with_suffix(".out.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.data_input", "--child", str(model), str(train), str(out)],
        cwd=ROOT,
        env=environment,
    )
    if process.wait() != 0:
        raise RuntimeError(f"the child for {train} failed")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, train, out = args.child
        Path(out).write_text(json.dumps(run_child(model, train)))
        return
    results: dict[str, dict] = {"jsonl": {}, "parquet": {}}
    with tempfile.TemporaryDirectory(prefix="data-input-") as folder:
        work = Path(folder)
        model = _model(work)
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = _write_inputs(work, rows)
            for kind, train in inputs.items():
                figures = dict(_measure(model, train), file_bytes=train.stat().st_size)
                results[kind][str(rows)] = figures
                print(
                    f"{kind:<8} {rows:>9} rows  peak RSS {figures['peak_rss_bytes'] / 2**20:8.1f} MiB  "
                    f"{figures['seconds']:7.1f} s",
                    flush=True,
                )
                train.unlink()
    path = write_result(
        "data_input",
        {"words_per_row": WORDS_PER_ROW, "parquet_row_group_rows": 65536, "results": results},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
