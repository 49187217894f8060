"""Per family: what an index tracks (coverage), whether it is exact, and what an index pass costs beside a bare
backward.

For each family of engine.testing.families (tiny random models from their transformers configs, width 32, two
layers), on random 16-word rows (a word-level tokenizer): the coverage report (modules tracked by kind, tracked /
attributable parameters); exactness: the relative error of dim-0 float64 per-example rows against autograd over
the model's own parameters, one row at a time (tests.reference); and the time of pass 1 (engine.gradients.passes.
gradient_pass at projection dim 16, float32, covariance sums included) against a bare pass: the same batches'
forward and backward to every parameter's summed gradient, as a training step takes them. The fastest of the
rounds, run side by side (on a machine shared with other work the fastest is the least disturbed; the median
is kept too). Results: benchmarks/results/coverage.json.

Usage: python -m benchmarks.coverage [--rows 32] [--rounds 5] [--families llama,mixtral]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import first_line, positive_int, random_corpus, side_by_side, write_jsonl, write_result

WORDS_PER_ROW = 16
VOCABULARY = 120
BATCH = 8


def _config(root: Path, model: Path, train: Path, dim: int, dtype: str):
    from engine.config import parse_config

    return parse_config(
        {
            "model": {"path": str(model), "tokenizer": str(model / "tokenizer"), "dtype": dtype},
            "data": {"train": str(train), "max_length": 32, "batch_size": BATCH},
            "projection": {"dim": dim},
            "store": {"path": str(root / "unused.zarr"), "dtype": dtype},
        }
    )


def _bare(context, rows) -> float:
    """Seconds of forward + backward to the summed gradient of every parameter, batch by batch."""
    from engine.capture.loss import per_example_loss
    from engine.data.batching import collate

    parameters = [p for p in context.model.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        batch = collate(rows[start : start + BATCH], context.pad_id)
        logits = context.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        torch.autograd.grad(per_example_loss(logits.float(), batch.labels).sum(), parameters, allow_unused=True)
    elapsed = time.perf_counter() - started
    for parameter in parameters:
        parameter.requires_grad_(False)
    return elapsed


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _exactness(root: Path, model: Path, train: Path, family: str) -> float:
    from transformers import AutoModelForCausalLM

    from engine.gradients.context import prepare_index_job
    from engine.gradients.passes import gradient_pass
    from engine.testing.families import is_moe
    from tests.reference import autograd_per_example_of_parameters

    job = prepare_index_job(_config(root, model, train, 0, "float64"))
    rows = job.tokenized[:4]
    ours = torch.from_numpy(gradient_pass(job.context, rows).grads)
    extra = {"experts_implementation": "eager"} if is_moe(family) else {}
    reference_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64, **extra)
    reference = autograd_per_example_of_parameters(reference_model, list(job.context.modules), rows, job.context.pad_id)
    return float((ours - reference).norm() / reference.norm())


def measure(family: str, rows: int, rounds: int, work: Path) -> dict:
    from engine.gradients.context import prepare_index_job
    from engine.gradients.passes import gradient_pass
    from engine.testing.families import is_moe, save_family

    texts = random_corpus(rows, WORDS_PER_ROW, VOCABULARY, seed=1)
    root = work / family
    model = save_family(root / "model", family, [" ".join(f"w{i}" for i in range(VOCABULARY))])
    train = write_jsonl(root / "train.jsonl", texts)
    job = prepare_index_job(_config(root, model, train, 16, "float32"))
    context, tokenized = job.context, job.tokenized
    times = side_by_side(
        {
            "index_pass": lambda: _timed(lambda: gradient_pass(context, tokenized)),
            "bare": lambda: _bare(context, tokenized),
        },
        rounds,
    )
    coverage = context.coverage.to_dict() if context.coverage is not None else {}
    index_s, bare_s = min(times["index_pass"]), min(times["bare"])
    return {
        "family": family,
        "moe": is_moe(family),
        "modules_tracked": len(context.modules),
        "kinds_tracked": {kind: count["tracked_modules"] for kind, count in coverage.get("kinds", {}).items()},
        "coverage": coverage.get("coverage"),
        "tracked_parameters": coverage.get("tracked_parameters"),
        "attributable_parameters": coverage.get("attributable_parameters"),
        "not_tracked": coverage.get("skipped", []),
        "relative_error_dim0_float64": _exactness(root, model, train, family),
        "index_pass_s": round(index_s, 4),
        "bare_s": round(bare_s, 4),
        "index_over_bare": round(index_s / bare_s, 2),
        "median_index_over_bare": round(statistics.median(times["index_pass"]) / statistics.median(times["bare"]), 2),
        "times": times,
    }


def main() -> None:
    from engine.testing.families import available_families

    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--families", default=",".join(available_families()))
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(available_families()))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {available_families()}")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for family in families:
            result = measure(family, args.rows, args.rounds, Path(work))
            results.append(result)
            print(
                f"{family:12s} modules {result['modules_tracked']:3d}  coverage {result['coverage']:.3f}  "
                f"error {result['relative_error_dim0_float64']:.1e}  index {result['index_pass_s']:.3f}s  "
                f"bare {result['bare_s']:.3f}s  x{result['index_over_bare']}",
                flush=True,
            )
    path = write_result("coverage", {"rows": args.rows, "rounds": args.rounds, "families": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
