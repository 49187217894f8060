"""Shared by the evaluation reproductions: Markdown tables, the Agg backend, timing, --full/--workers."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, machine, non_negative_int  # noqa: E402

COLOURS = {
    "grad_dot": "tab:blue",
    "grad_cos": "tab:cyan",
    "if": "tab:red",
    "source": "tab:green",
    "fast_source": "tab:olive",
    "trak": "tab:purple",
    "tracin": "tab:orange",
    "datainf": "tab:brown",
    "random": "tab:gray",
}
NAMES = {
    "grad_dot": "Grad-Dot",
    "grad_cos": "Grad-Cos",
    "if": "IF (EK-FAC)",
    "source": "Source",
    "fast_source": "Fast-Source",
    "trak": "TRAK-style",
    "tracin": "TracInCP",
    "datainf": "DataInf",
    "random": "random",
}


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", action="store_true", help="the paper-sized run (for a GPU machine or a cluster)")
    parser.add_argument(
        "--workers", type=non_negative_int, default=0, help="Ray workers for the retraining (0: in process)"
    )
    return parser.parse_args()


def markdown_table(header: list[str], rows: list[list], path: Path) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {os.cpu_count()} cores (shared), torch {m['torch']}, {m['torch_threads']} threads"


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 1)


__all__ = ["COLOURS", "NAMES", "RESULTS", "Clock", "arguments", "machine_line", "markdown_table", "plt"]
