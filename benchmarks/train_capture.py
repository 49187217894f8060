"""Attribution at the cost of training: a Trainer fine-tune with and without TributaryCallback (empirical
Fisher, and the true Fisher's sampled-label backward), and the alternative (save checkpoints at the segment
boundaries, then `tributary index` them), side by side in one run.

Usage: python -m benchmarks.train_capture [--rows 64] [--rounds 1] [--dim 16] [--hidden 128] [--layers 4]
       [--sequence 64]   (the default, 4 layers x 128 on 64 tokens, takes about a minute on 2 quiet CPU cores)

The default model is so small that fixed per-step costs (Python hooks, per-module kernel launches) weigh on
every step; `--hidden 256 --sequence 128` is a size whose training step is dominated by its arithmetic.

Each run writes its own file, benchmarks/results/train_capture-rows<R>-dim<D>-rounds<N>-<UTC time>.json (with
-h<H>-l<L>-s<S> before the time where the model is not the default), with the machine's load average before and
after: no run overwrites another's (train_capture.json is the quiet run of the first round, kept as it was).

Times per variant: the whole `trainer.train()` (capture included: rows, factors, segment stores, the final
weights), the optimizer steps alone (on_step_begin to on_step_end, the capture's per-step work included, and
the write of every segment but the last, which happens when the step after its boundary begins), the capture's
segment writes alone (all of them), and for the alternative the index of its checkpoints after training.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from benchmarks.common import (
    first_line,
    gpt2_like,
    non_negative_int,
    positive_int,
    random_corpus,
    side_by_side,
    write_jsonl,
    write_result,
)
from engine.config import JobConfig, parse_config
from engine.integrations import TrainingRows, TributaryCallback
from engine.local_or_ray import run_index

BATCH = 8
HEADS = 4
SEGMENTS = 2


class StepClock(TrainerCallback):
    """Seconds inside optimizer steps; registered last, so its on_step_end runs after the capture's."""

    def __init__(self):
        self.seconds = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._start


def _train(model_dir: Path, config: JobConfig, out: Path, capture: bool, save_steps: int | None) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = TrainingRows(config)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=1e-3,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 1,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
    )
    clock = StepClock()
    tributary = TributaryCallback(config, rows)
    callbacks: list[TrainerCallback] = [tributary] if capture else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=rows.collate if capture else rows.plain_collate,
        callbacks=[*callbacks, clock],
    )
    started = time.perf_counter()
    trainer.train()
    if save_steps:
        trainer.save_model(str(out))  # the final model, as the run's last checkpoint
    result = {"train_s": time.perf_counter() - started, "steps_s": clock.seconds}
    if tributary.capture is not None:  # per segment, not per step: the steps time holds every segment but the last
        result["segment_writes_s"] = tributary.capture.segment_write_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=64)
    parser.add_argument("--rounds", type=positive_int, default=1)
    parser.add_argument("--dim", type=non_negative_int, default=16)
    parser.add_argument("--hidden", type=positive_int, default=128, help="model width (a multiple of 4, the heads)")
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--sequence", type=positive_int, default=64, help="words (tokens) per training row")
    args = parser.parse_args()
    if args.hidden % HEADS:
        parser.error(f"--hidden {args.hidden} is not a multiple of the {HEADS} attention heads")
    sequence = args.sequence
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="tributary-train-capture-"))
    load_before = os.getloadavg()
    try:
        texts = random_corpus(args.rows, sequence, vocabulary=2000)
        model_dir = gpt2_like(
            work / "model", texts, hidden=args.hidden, layers=args.layers, heads=HEADS, positions=sequence + 8
        )
        train = write_jsonl(work / "train.jsonl", texts)
        steps = -(-args.rows // BATCH)

        def config(store: str, fisher: bool | str = "empirical", **extra) -> JobConfig:
            raw = {
                "model": {"path": str(model_dir), "dtype": "float32"},
                "data": {"train": str(train), "max_length": sequence + 8, "batch_size": BATCH},
                "projection": {"dim": args.dim, "kind": "rademacher"},
                "curvature": {"strategy": "ekfac", "fisher": fisher},
                "method": {"name": "source"},
                "training_run": {"segments": SEGMENTS, **extra},
                "store": {"path": str(work / store)},
            }
            return parse_config(raw)

        details: dict[str, list[dict]] = {
            "train": [],
            "train_capture": [],
            "train_capture_true_fisher": [],
            "train_checkpoints_index": [],
        }

        def plain() -> float:
            result = _train(model_dir, config("unused.zarr"), work / "plain", capture=False, save_steps=None)
            details["train"].append(result)
            return result["train_s"]

        def captured() -> float:
            shutil.rmtree(work / "captured.zarr", ignore_errors=True)
            result = _train(model_dir, config("captured.zarr"), work / "captured", capture=True, save_steps=None)
            details["train_capture"].append(result)
            return result["train_s"]

        def captured_true_fisher() -> float:
            shutil.rmtree(work / "fisher.zarr", ignore_errors=True)
            fisher = config("fisher.zarr", fisher=True)
            result = _train(model_dir, fisher, work / "fisher", capture=True, save_steps=None)
            details["train_capture_true_fisher"].append(result)
            return result["train_s"]

        def checkpoints_then_index() -> float:
            out = work / "checkpoints"
            shutil.rmtree(out, ignore_errors=True)
            result = _train(model_dir, config("unused.zarr"), out, capture=False, save_steps=steps // SEGMENTS)
            indexed = config("indexed.zarr", trainer_dir=str(out))
            started = time.perf_counter()
            run_index(indexed, overwrite=True, show_progress=False)
            result["index_s"] = time.perf_counter() - started
            details["train_checkpoints_index"].append(result)
            return result["train_s"] + result["index_s"]

        times = side_by_side(
            {
                "train": plain,
                "train_capture": captured,
                "train_capture_true_fisher": captured_true_fisher,
                "train_checkpoints_index": checkpoints_then_index,
            },
            args.rounds,
        )
        medians = {name: statistics.median(values) for name, values in times.items()}

        def median_of(name: str, key: str) -> float:
            return statistics.median(d[key] for d in details[name][1:])  # the warm-up run left out

        step_medians = {name: median_of(name, "steps_s") for name in details}
        segment_writes = {
            name: median_of(name, "segment_writes_s") for name in ("train_capture", "train_capture_true_fisher")
        }
        payload = {
            "what": f"Trainer fine-tune of a GPT-2-like model ({args.layers} layers, hidden {args.hidden}) on CPU: plain, with "
            "TributaryCallback (EK-FAC, empirical and true Fisher, rademacher projection), and with checkpoints at the "
            f"{SEGMENTS} segment boundaries then `tributary index` of them (the post-hoc alternative)",
            "rows": args.rows,
            "hidden": args.hidden,
            "layers": args.layers,
            "sequence": sequence,
            "batch": BATCH,
            "optimizer_steps": steps,
            "segments": SEGMENTS,
            "projection_dim": args.dim,
            "rounds": args.rounds,
            "seconds": times,
            "median_s": medians,
            "median_steps_s": step_medians,
            "median_segment_writes_s": segment_writes,
            "index_s": median_of("train_checkpoints_index", "index_s"),
            "capture_over_train": medians["train_capture"] / medians["train"],
            "capture_steps_over_train_steps": step_medians["train_capture"] / step_medians["train"],
            "true_fisher_over_train": medians["train_capture_true_fisher"] / medians["train"],
            "true_fisher_steps_over_train_steps": step_medians["train_capture_true_fisher"] / step_medians["train"],
            "true_fisher_over_capture": medians["train_capture_true_fisher"] / medians["train_capture"],
            "index_path_over_train": medians["train_checkpoints_index"] / medians["train"],
            "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
            "cpus": os.cpu_count(),
        }
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        size = (
            ""
            if (args.hidden, args.layers, sequence) == (128, 4, 64)
            else f"-h{args.hidden}-l{args.layers}-s{sequence}"
        )
        path = write_result(f"train_capture-rows{args.rows}-dim{args.dim}-rounds{args.rounds}{size}-{stamp}", payload)
        for name, value in medians.items():
            writes = f"   segment writes {segment_writes[name]:5.2f} s" if name in segment_writes else ""
            print(f"{name:<26} {value:7.2f} s   steps {step_medians[name]:6.2f} s{writes}")
        print(
            f"capture / train: {payload['capture_over_train']:.2f}x (steps {payload['capture_steps_over_train_steps']:.2f}x)"
        )
        print(
            f"capture, true Fisher / train: {payload['true_fisher_over_train']:.2f}x "
            f"(steps {payload['true_fisher_steps_over_train_steps']:.2f}x)"
        )
        print(f"checkpoints + index / train: {payload['index_path_over_train']:.2f}x -> {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
