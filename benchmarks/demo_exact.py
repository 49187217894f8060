"""`tributary query --exact` on the demo's LLM: SmolLM2-135M-Instruct with its committed LoRA adapter, the 64
demo rows, the demo prompts completed by the tuned model (greedy, `--small`'s 8 tokens), all in this process.

Measured once (a single run: indicative on a shared machine): the demo's index (dim 16, EK-FAC, true Fisher)
with `exact: {factors: true}`, the exact query (query gradients + one pass over the 64 rows), the dim-16 store's
own query, the overlap of each prompt's store top-10 with its exact top-10, and the bytes a dim-0 store would
hold: the adapter's tracked weights (what this config tracks) and, for scale, every linear weight of the model.

Usage: python -m benchmarks.demo_exact [--workdir DIR] [--result demo_exact]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import first_line, write_result


def _timed(call):
    start = time.perf_counter()
    value = call()
    return value, round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--result", default="demo_exact")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from engine.config import GenerationSettings, QueryOptions, parse_config
    from engine.demo_assets.adapter import COMMITTED, recipe_rows, rows_jsonl, verified_adapter
    from engine.demo_assets.shakespeare import demo_queries
    from engine.demo_assets.smollm2 import ensure_smollm2
    from engine.exact.stored_factors import full_spec
    from engine.local_or_ray import run_exact, run_index, run_query
    from engine.query.attributor import Attributor
    from engine.query.generate import PromptRow
    from engine.store import GradientStore

    root = Path(args.workdir or tempfile.mkdtemp(prefix="demo-exact-"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = recipe_rows(tokenizer)
    (root / "train.jsonl").write_text(rows_jsonl(rows))
    adapter = verified_adapter(COMMITTED, rows)
    config = parse_config(
        {  # the demo's settings (engine/demo.py), in this process, with the full-width factors
            "model": {"path": str(model_dir), "adapter": str(adapter)},
            "data": {"train": str(root / "train.jsonl"), "max_length": 112, "batch_size": 8},
            "projection": {"dim": 16, "seed": 0},
            "curvature": {"strategy": "ekfac", "fisher": True, "seed": 0},
            "method": {"name": "if"},
            "store": {"path": str(root / "store.zarr"), "rows_per_chunk": 8},
            "exact": {"factors": True},
        }
    )
    _, index_s = _timed(lambda: run_index(config, overwrite=True, show_progress=False))
    store = GradientStore.open(config.store.path)
    timings = store.manifest.timings if hasattr(store.manifest, "timings") else {}

    attributor = Attributor.load(config)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, chat=True)
    prompts = demo_queries(tokenizer)
    tuned = attributor.generated_queries(
        [PromptRow(i, q["id"], i + 1, q["prompt"]) for i, q in enumerate(prompts)], settings, "the demo's prompts"
    )
    queries = root / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"id": q["id"], "prompt": q["chat_prompt"], "completion": t.completion}) + "\n"
            for q, t in zip(prompts, tuned)
        )
    )
    torch.set_num_threads(2)
    exact, exact_s = _timed(lambda: run_exact(config, str(queries), QueryOptions(k=10)))
    stored, store_s = _timed(lambda: run_query(config, str(queries), k=10))
    overlaps = [
        len(set(exact.result.top_indices[q].tolist()) & set(stored.top_indices[q].tolist())) / 10
        for q in range(len(prompts))
    ]
    width = full_spec(store).total_width
    linear = sum(
        module.weight.numel()
        for module in attributor.context.model.modules()
        if isinstance(module, torch.nn.Linear) and "lora" not in type(module).__name__.lower()
    )
    payload = {
        "rows": len(rows),
        "queries": len(prompts),
        "query_row_tokens": [len(t.row.input_ids) for t in tuned],
        "index_with_exact_factors_s": index_s,
        "index_timings": timings,
        "query_exact_s": exact_s,
        "query_store_s": store_s,
        "top10_overlap_store_vs_exact": overlaps,
        "top10_overlap_mean": float(np.mean(overlaps)),
        "dim0_row_bytes_adapter_float32": width * 4,
        "dim0_store_bytes_adapter_float32": width * 4 * len(rows),
        "dim0_row_bytes_all_linear_weights_float32": linear * 4,
        "dim0_store_bytes_all_linear_weights_float32": linear * 4 * len(rows),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(payload, indent=1, default=str))
    print(write_result(args.result, payload))


if __name__ == "__main__":
    main()
