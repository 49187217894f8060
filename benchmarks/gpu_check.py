"""The GPU check: index and query on a CUDA machine with every placement, against a bare forward+backward.

On one or more GPUs (under 8 minutes on one modern GPU):

  single_bf16        SmolLM2-135M-Instruct in bf16 on one GPU: `tributary index` (EK-FAC, dim 16) + a query
  single_bf16_lora   the same with a LoRA adapter (random, non-zero: the gradients are the adapter's)
  device_map_offload accelerate's device_map over the GPU, with CPU offload of the layers past a memory cap
  zero3              DeepSpeed ZeRO-3 with one rank per GPU (NCCL), as Ray actors

For each: index tokens/s, the same model's bare forward+backward tokens/s (batched, weight gradients
materialised), their ratio, and the peak GPU memory of this process (the zero3 ranks report their own).
Results: benchmarks/results/gpu_<name>.json and gpu_check.json (machine and GPU named).

`--cpu-dry-run` runs the same steps on this CPU with a tiny Llama built from config, float32, zero3 with 2 gloo
ranks, writing under `--out` (default: a temporary directory) instead of benchmarks/results/; the tests run it.

Usage: python -m benchmarks.gpu_check [--cpu-dry-run] [--rows 256] [--out DIR] [--steps single_bf16,zero3]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import RESULTS, first_line, machine, positive_int

SEQUENCE = 128
BATCH = 8


def _rows(count: int, dry_run: bool) -> list[dict]:
    from engine.demo_assets.shakespeare import passages

    rows = passages(count, seed=0, plays=None)
    return [{"id": row["id"], "prompt": row["prompt"], "completion": row["completion"]} for row in rows]


def _model(work: Path, dry_run: bool) -> Path:
    if dry_run:
        from engine.demo_assets.shakespeare import passages
        from engine.testing.tiny import save_tiny

        texts = [row["prompt"] + row["completion"] for row in passages(64, seed=0, plays=None)]
        return save_tiny(work / "tiny-llama", "llama", texts, hidden=32, layers=4, heads=4, seed=0)
    from engine.demo_assets.smollm2 import ensure_smollm2

    return ensure_smollm2(quiet=True)


def _adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero B (a fresh adapter's B is zero, and so would be half its gradients)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(str(out))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(model_dir: Path, train: Path, store: Path, dtype: str, placement: dict, **extra) -> dict:
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(train), "max_length": SEQUENCE, "batch_size": BATCH},
        "projection": {"dim": 16, "seed": 0},
        "curvature": {"strategy": "ekfac", "seed": 0},
        "method": {"name": "if"},
        "store": {"path": str(store), "dtype": "float32"},
        "placement": dict(placement, dtype=dtype),
    }
    for section, values in extra.items():
        raw[section] = dict(raw.get(section, {}), **values)
    return raw


def _bare_tokens_per_s(raw: dict) -> float:
    """Tokens/s of a batched forward + loss.backward() of the same model, rows and dtype, weight grads on."""
    from engine.capture.loss import per_example_loss
    from engine.config import parse_config
    from engine.data.batching import batches
    from engine.gradients.context import prepare_index_job

    job = prepare_index_job(parse_config(raw))
    model, device = job.context.model, job.context.device
    model.requires_grad_(True)
    tokens = sum(len(row.input_ids) for row in job.tokenized)

    def one_pass() -> float:
        _synchronise()
        started = time.perf_counter()
        for batch in batches(job.tokenized, BATCH, job.context.pad_id):
            batch = batch.to(device)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            per_example_loss(logits.float(), batch.labels).sum().backward()
            model.zero_grad(set_to_none=True)
        _synchronise()
        return time.perf_counter() - started

    one_pass()  # warm-up: kernels, allocator
    return tokens / statistics.median(one_pass() for _ in range(2))


def _synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_gpu_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _index_and_query(raw: dict, queries: Path, work: Path) -> dict:
    """Index (timed from the manifest: the passes over the data) and one query of the first rows."""
    from engine.config import parse_config
    from engine.local_or_ray import run_index, run_query
    from engine.store import GradientStore

    config = parse_config(raw)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    store = run_index(config, overwrite=True, show_progress=False)
    assert isinstance(store, GradientStore)  # no training_run section: the final model's store
    timings = store.manifest.timings or {}
    tokens = int(store.row_metadata()["num_tokens"].sum())
    passes_s = timings["total_s"] - timings["setup_s"]
    started = time.perf_counter()
    result = run_query(config, str(queries), 5, out=str(work / "answers.jsonl"))
    return {
        "rows": store.rows,
        "tokens": tokens,
        "index_passes_s": round(passes_s, 3),
        "index_tokens_per_s": round(tokens / passes_s, 1),
        "query_s": round(time.perf_counter() - started, 3),
        "queries": int(result.top_indices.shape[0]),
        "peak_gpu_bytes": _peak_gpu_bytes(),
    }


def run_check(dry_run: bool, rows: int, out: Path, only: list[str] | None = None) -> dict:
    """Every step of the check; each step's figures are written as soon as it ends."""
    from engine.errors import TributaryError
    from engine.testing.offload import memory_for_half_the_layers

    work = Path(tempfile.mkdtemp(prefix="tributary-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = _model(work, dry_run)
        train = _write_jsonl(work / "train.jsonl", _rows(rows, dry_run))
        queries = _write_jsonl(work / "queries.jsonl", _rows(rows, dry_run)[:4])
        adapter = _adapter(model_dir, work / "adapter")
        dtype = "float32" if dry_run else "bfloat16"
        ranks = 2 if dry_run else max(1, torch.cuda.device_count())
        cluster = {"address": "local", "cpus_per_worker": 1, "local_cpus": max(2, ranks)}
        # half the decoder layers past the first device's cap: offloaded to the CPU (GPU) or to disk (dry run)
        cap = memory_for_half_the_layers(model_dir)
        offload = (
            {"kind": "device_map", "offload": str(work / "offload"), "max_memory": {"cpu": cap}}
            if dry_run
            else {"kind": "device_map", "offload": "cpu", "max_memory": {"0": cap}}
        )
        steps: dict[str, Callable[[], dict]] = {
            "single_bf16": lambda: _config(model_dir, train, work / "single.zarr", dtype, {"kind": "single"}),
            "single_bf16_lora": lambda: _config(
                model_dir, train, work / "lora.zarr", dtype, {"kind": "single"}, model={"adapter": str(adapter)}
            ),
            "device_map_offload": lambda: _config(model_dir, train, work / "device_map.zarr", dtype, offload),
            "zero3": lambda: dict(
                _config(
                    model_dir,
                    train,
                    work / "zero3.zarr",
                    dtype,
                    {"kind": "zero3", "devices_per_replica": ranks},
                ),
                cluster=cluster,
            ),
        }
        summary = {"dry_run": dry_run, "machine": machine(), "gpus": torch.cuda.device_count(), "steps": {}}
        for name, make in steps.items():
            if only and name not in only:
                continue
            raw = make()
            started = time.perf_counter()
            single = {k: v for k, v in raw.items() if k != "cluster"}
            single["placement"] = {"kind": "single", "dtype": dtype}
            try:
                figures = _index_and_query(raw, queries, work)
            except TributaryError as error:  # one placement that cannot run here does not hide the others
                summary["steps"][name] = {"placement": raw["placement"], "error": str(error)}
                print(f"{name:<20} not run: {error}", flush=True)
                continue
            _free()
            bare = _bare_tokens_per_s(single)
            figures["bare_tokens_per_s"] = round(bare, 1)
            figures["index_over_bare"] = round(bare / figures["index_tokens_per_s"], 3)
            figures["placement"] = raw["placement"]
            figures["wall_s"] = round(time.perf_counter() - started, 1)
            summary["steps"][name] = figures
            (out / f"gpu_{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
            print(
                f"{name:<20} index {figures['index_tokens_per_s']:>10.1f} tok/s   bare {bare:>10.1f} tok/s   "
                f"index/bare time {figures['index_over_bare']:.2f}x   peak GPU "
                f"{_gib(figures['peak_gpu_bytes'])}   ({figures['wall_s']} s)",
                flush=True,
            )
            _free()
        summary["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on CPU, results under --out")
    parser.add_argument("--rows", type=positive_int, default=None, help="training rows (default 256; 24 for a dry run)")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument("--steps", default=None, help="comma-separated steps to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu-dry-run to check the script on CPU", file=sys.stderr)
        return 2
    rows = args.rows or (24 if args.cpu_dry_run else 256)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if args.cpu_dry_run else RESULTS)
    run_check(args.cpu_dry_run, rows, out, args.steps.split(",") if args.steps else None)
    print(f"wrote {out}/gpu_*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
