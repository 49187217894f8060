"""Helpers shared by the benchmarks: machine description, a GPT-2-like model on random text, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def positive_int(text: str) -> int:
    """argparse type for a count that must be at least 1 (rows, rounds, sizes): a clean usage error otherwise."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for a count where 0 has a meaning (dim 0: full width; workers 0: in process)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is below {least}")
    return value


def first_line(doc: str | None) -> str:
    """A benchmark's --help description: its module docstring's first line (none under python -OO)."""
    return doc.splitlines()[0] if doc else ""


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = dict(payload, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def random_corpus(rows: int, words_per_row: int, vocabulary: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocabulary)]
    return [" ".join(rng.choice(words) for _ in range(words_per_row)) for _ in range(rows)]


def gpt2_like(directory: Path, texts: list[str], hidden: int, layers: int, heads: int, positions: int) -> Path:
    from engine.testing.tiny import save_tiny

    vocabulary_texts = [" ".join(sorted({w for t in texts for w in t.split()}))]
    return save_tiny(
        directory, "gpt2", vocabulary_texts, hidden=hidden, layers=layers, heads=heads, max_positions=positions
    )


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def side_by_side(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Warm every variant up once, then run them round-robin, so drift in machine speed hits all alike.

    Each variant is a callable returning the seconds to count (it may exclude its own set-up).
    """
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name].append(run())
    return times


def bare_store_manifest(rows: int, width: int, rows_per_chunk: int, dtype: str = "float32"):
    """The manifest of a store of synthetic rows: it records no model, data or projection (nothing that reads
    such a store looks at them), only the rows' shape and chunking, and a fresh store id."""
    from engine import __version__
    from engine.projection import ProjectionSpec
    from engine.store.identity import new_store_id
    from engine.store.manifest import Fingerprints, StoreManifest

    return StoreManifest(
        code_version=__version__,
        fingerprints=Fingerprints(model="", tokenizer="", dataset="", projection=""),
        projection=ProjectionSpec(dim=0, seed=0, kind="rademacher", modules=()),
        curvature={},
        data={},
        model={},
        config={},
        rows=rows,
        width=width,
        dtype=dtype,
        rows_per_chunk=rows_per_chunk,
        store_id=new_store_id(),
    )


def bare_pass_seconds(config, batch_size: int) -> float:
    """One forward and backward over the config's training rows in batches of `batch_size`, nothing captured: the
    "bare" of every × bare figure."""
    from engine.capture.loss import per_example_loss
    from engine.data.batching import batches
    from engine.gradients.context import prepare_index_job

    job = prepare_index_job(config)
    model = job.context.model
    model.requires_grad_(True)
    started = time.perf_counter()
    for batch in batches(job.tokenized, batch_size, job.context.pad_id):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        per_example_loss(logits, batch.labels).sum().backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def mean_spearman(ours, reference) -> float:
    """The rank correlation of each query's scores (a row) with the reference's, averaged over queries."""
    import numpy as np

    def ranks(matrix):
        return np.argsort(np.argsort(np.asarray(matrix), axis=1, kind="stable"), axis=1, kind="stable").astype(
            np.float64
        )

    a, b = ranks(ours), ranks(reference)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    return float(np.mean((a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))))


def top_overlap(ours, reference, k: int = 10) -> float:
    """|top-k ∩ reference top-k| / k, averaged over queries (rows of index lists, best first)."""
    import numpy as np

    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ours, reference)]))


def ratio_table(rows: dict[str, dict], bare: float) -> dict[str, dict]:
    """Each row's `seconds` over the bare pass (`ratio_to_bare`), seconds rounded; changes and returns `rows`."""
    for row in rows.values():
        row["ratio_to_bare"] = round(row["seconds"] / bare, 2)
        row["seconds"] = round(row["seconds"], 3)
    return rows


def print_table(rows: dict[str, dict]) -> None:
    """One line per row: its seconds and its other float figures."""
    for name, row in rows.items():
        extras = {k: round(v, 3) for k, v in row.items() if isinstance(v, float) and k != "seconds"}
        print(f"{name:<32}{row['seconds']:>9.2f} s  {extras}")
