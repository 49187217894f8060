"""Placements side by side on one Llama-like model built from config: single, device_map with offload, zero3.

The model has random weights and is as large as this machine's memory and patience allow (about 280M
parameters by default, 1.1 GB in float32). Each variant runs `tributary index` (curvature identity, dim 16:
the gradient pass every strategy shares) in a fresh child process, one after the other, and reports:

  peak RSS per process   the child (driver) and every Ray worker process it started, polled every 0.1 s
  parameter bytes        what one rank or replica process holds resident: the whole model for single, the
                         parameters not offloaded for device_map, the ZeRO-3 partition for each zero3 rank
  tokens/s               training tokens over the passes' time (model loading and set-up excluded)

Variants: single; device_map with half the decoder layers offloaded to disk (this machine has no GPU, so the
execution device is the CPU and accelerate's hooks load each offloaded layer from disk when it runs); zero3 with
1 and 2 gloo ranks as Ray actors (one thread each: this machine has 2 cores). Results:
benchmarks/results/placement.json.

Usage: python -m benchmarks.placement [--hidden 1536] [--layers 12] [--rows 16] [--variants single,device_map-disk,zero3-1,zero3-2]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import first_line, positive_int, random_corpus, write_jsonl, write_result
from benchmarks.peak_memory import high_water_bytes

SEQUENCE = 64
BATCH = 4
VARIANTS = ("single", "device_map-disk", "zero3-1", "zero3-2")


def _placement(variant: str, work: Path) -> tuple[dict, dict | None]:
    """(placement section, cluster section) of a variant."""
    if variant == "single":
        return {"kind": "single"}, None
    if variant == "device_map-disk":
        from engine.testing.offload import memory_for_half_the_layers

        cap = memory_for_half_the_layers(work / "model")
        return {"kind": "device_map", "offload": str(work / "offload"), "max_memory": {"cpu": cap}}, None
    ranks = int(variant.split("-")[1])
    cluster = {"address": "local", "cpus_per_worker": 1, "local_cpus": 2, "workers": 1}  # one group: one replica
    return {"kind": "zero3", "devices_per_replica": ranks}, cluster


def _config(variant: str, work: Path) -> dict:
    placement, cluster = _placement(variant, work)
    raw = {
        "model": {"path": str(work / "model"), "dtype": "float32"},
        "data": {"train": str(work / "train.jsonl"), "max_length": SEQUENCE, "batch_size": BATCH},
        "projection": {"dim": 16},
        "curvature": {"strategy": "identity"},
        "store": {"path": str(work / f"store-{variant}.zarr")},
        "placement": placement,
    }
    if cluster is not None:
        raw["cluster"] = cluster
    return raw


def run_variant(variant: str, work: Path) -> dict:
    """In the child: index once, and report tokens/s and the parameter bytes each process holds."""
    import torch

    from engine.config import parse_config
    from engine.local_or_ray import run_index

    torch.set_num_threads(1 if variant.startswith("zero3") else 2)
    config = parse_config(_config(variant, work))
    store = run_index(config, overwrite=True, show_progress=False)
    timings = store.manifest.timings or {}
    tokens = int(store.row_metadata()["num_tokens"].sum())  # pyright: ignore[reportAttributeAccessIssue]
    passes_s = timings["total_s"] - timings["setup_s"]
    return {
        "tokens": tokens,
        "passes_s": round(passes_s, 2),
        "tokens_per_s": round(tokens / passes_s, 2),
        "parameter_bytes": resident_parameter_bytes(config),
        "driver_peak_rss_bytes": high_water_bytes(),
    }


def resident_parameter_bytes(config) -> list[int]:
    """Bytes of parameters one process holds, per rank (one entry unless zero3), measured on the loaded model:
    for zero3 each rank reports its partition (ds_tensor) bytes itself."""
    if config.placement.kind == "zero3":
        from engine.local_or_ray import shard_executor

        executor = shard_executor(config)
        try:
            facts = executor.describe()
        finally:
            executor.shutdown()
        return [int(b) for b in facts["partition_bytes"]]
    from engine.gradients.context import load_model_context
    from engine.model.placement import resident_parameter_bytes as measured

    return [measured(load_model_context(config).model)]


class RssPoller:
    """The peak RSS of a process tree and of every Ray worker process, by pid."""

    def __init__(self, root_pid: int):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(root_pid)
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> RssPoller:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _processes(self):
        found = {self.root.pid: self.root}
        try:
            found.update({p.pid: p for p in self.root.children(recursive=True)})
        except self._psutil.Error:
            pass
        return found.values()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for process in self._processes():
                try:
                    name = " ".join(process.cmdline())[:80]
                    rss = process.memory_info().rss
                except self._psutil.Error:
                    continue
                if "ShardWorker" in name or "Zero" in name or process.pid == self.root.pid or rss > 200 << 20:
                    _, peak = self.peaks.get(process.pid, (name, 0))
                    self.peaks[process.pid] = (name, max(peak, rss))
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--hidden", type=positive_int, default=1536)
    parser.add_argument("--layers", type=positive_int, default=12)
    parser.add_argument("--rows", type=positive_int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.work)), flush=True)
        return
    from engine.testing.tiny import save_tiny

    work = Path(tempfile.mkdtemp(prefix="tributary-placement-"))
    try:
        texts = random_corpus(args.rows, SEQUENCE - 4, vocabulary=2000)
        save_tiny(
            work / "model",
            "llama",
            [" ".join(sorted({w for t in texts for w in t.split()}))],
            hidden=args.hidden,
            layers=args.layers,
            heads=max(1, args.hidden // 128),
            max_positions=SEQUENCE + 8,
        )
        write_jsonl(work / "train.jsonl", texts)
        parameters = _parameter_count(work / "model")
        print(f"model: {parameters / 1e6:.0f}M parameters ({parameters * 4 / 2**30:.2f} GiB in float32)", flush=True)
        table = {}
        for variant in args.variants.split(","):
            table[variant] = _measure(variant, work)
            row = table[variant]
            print(
                f"{variant:<16} {row['tokens_per_s']:>8.1f} tok/s  parameters/rank "
                f"{[round(b / 2**30, 2) for b in row['parameter_bytes']]} GiB  peak RSS "
                f"{[round(p['peak_rss_bytes'] / 2**30, 2) for p in row['processes']]} GiB",
                flush=True,
            )
        path = write_result(
            "placement",
            {
                "parameters": parameters,
                "parameter_bytes_float32": parameters * 4,
                "hidden": args.hidden,
                "layers": args.layers,
                "rows": args.rows,
                "sequence": SEQUENCE,
                "batch": BATCH,
                "results": table,
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118


def _measure(variant: str, work: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.placement", "--child", variant, "--work", str(work)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    with RssPoller(child.pid) as poller:
        output, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"placement variant {variant} failed (exit {child.returncode})")
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    result["processes"] = [
        {"pid": pid, "command": name, "peak_rss_bytes": peak} for pid, (name, peak) in sorted(poller.peaks.items())
    ]
    return result


if __name__ == "__main__":
    main()
