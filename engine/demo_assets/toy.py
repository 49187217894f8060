"""`tributary demo --toy`: a seconds-long offline end-to-end run.

A tiny GPT-2 and a word-level tokenizer are built from config, trained for a few seconds on a small
embedded corpus, indexed with EK-FAC in a 16-wide projection, and asked which training sentences
support three completions.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from engine.capture.loss import per_example_loss
from engine.config import load_config
from engine.data.batching import collate
from engine.data.rows import Row
from engine.data.tokenize import tokenize_rows
from engine.local_or_ray import run_index, run_query
from engine.testing.tiny import build_model, build_tokenizer

ANIMALS = ["fox", "owl", "bear", "otter", "crow", "hare", "wolf", "seal", "deer", "lynx", "mole", "wren"]
FOODS = ["berries", "fish", "mice", "honey", "seeds", "roots", "grubs", "clams", "moss", "nuts"]
PLACES = ["forest", "river", "meadow", "marsh", "valley", "harbor", "cave", "orchard"]
QUERIES = [
    ("the otter eats", "clams in the harbor"),
    ("the owl eats", "mice in the forest"),
    ("the bear eats", "honey in the valley"),
]

console = Console()


def corpus(size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = {
        f"the {a} eats {f} in the {p}"
        for a, f, p in [(q.split()[1], *c.replace(" in the", "").split()) for q, c in QUERIES]
    }
    while len(sentences) < size:
        sentences.add(f"the {rng.choice(ANIMALS)} eats {rng.choice(FOODS)} in the {rng.choice(PLACES)}")
    ordered = sorted(sentences)
    rng.shuffle(ordered)
    return ordered


def _train(model, tokenizer, texts: list[str], steps: int) -> None:
    rows = tokenize_rows(
        [Row(index=i, id=str(i), line=i + 1, text=t) for i, t in enumerate(texts)], tokenizer, 32, "demo corpus"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = random.Random(0)
    model.train()
    for _ in range(steps):
        batch = collate(generator.sample(rows, 16), tokenizer.pad_token_id)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        loss = per_example_loss(logits, batch.labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def run_toy_demo(workdir: str, small: bool = False, exact: bool = False) -> list[dict]:
    """`exact`: also fit the full-width factors and print the store's top-10 overlap with exact EK-FAC's."""
    started = time.perf_counter()
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    texts = corpus(48 if small else 160)
    tokenizer = build_tokenizer(texts, add_bos=False)
    model = build_model("gpt2", vocab_size=len(tokenizer), hidden=32, layers=2, heads=2)
    console.print(f"[bold]1/3[/] training a tiny GPT-2 on {len(texts)} sentences")
    _train(model, tokenizer, texts, steps=60 if small else 300)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"s{i:03d}", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as handle:
        for prompt, completion in QUERIES:
            handle.write(json.dumps({"prompt": prompt, "completion": " " + completion}) + "\n")
    config = {
        "model": {"path": str(root / "model")},
        "data": {"train": str(root / "train.jsonl"), "max_length": 32, "batch_size": 16},
        "projection": {"dim": 16, "seed": 0},
        "curvature": {"strategy": "ekfac"},
        "method": {"name": "if"},
        "store": {"path": str(root / "store.zarr"), "rows_per_chunk": 32},
    }
    if exact:
        config["exact"] = {"factors": True}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    job = load_config(root / "config.yaml")
    console.print("[bold]2/3[/] indexing the training set (projected gradients + EK-FAC)")
    run_index(job, overwrite=True)
    console.print("[bold]3/3[/] attributing three completions")
    run_query(job, str(root / "queries.jsonl"), 3, out=str(root / "results.jsonl"), scores_out=str(root / "scores.npy"))
    results = [json.loads(line) for line in open(root / "results.jsonl")]
    for result in results:
        table = Table(title=f"{result['prompt']} →{result['completion']}", title_justify="left")
        table.add_column("rank")
        table.add_column("score", justify="right")
        table.add_column("training example")
        for entry in result["top_k"]:
            table.add_row(str(entry["rank"]), f"{entry['score']:.3g}", entry.get("snippet", entry["id"]))
        console.print(table)
    if exact:
        _print_overlap(job, root)
    console.print(f"done in {time.perf_counter() - started:.1f} s; results in {root / 'results.jsonl'}")
    return results


def _print_overlap(job, root: Path) -> None:
    from engine.demo_assets.exact_overlap import exact_overlap

    overlap = exact_overlap(job, str(root / "queries.jsonl"))
    (root / "exact_overlap.json").write_text(
        json.dumps({"ids": overlap.ids, "top10_overlap": overlap.shares, "seconds": overlap.seconds})
    )
    console.print(overlap.line())
