"""Whether an existing store was built from the same model, tokenizer, data and projection."""

from __future__ import annotations

CHECKED = ("model", "tokenizer", "dataset", "projection")
WHAT = {
    "model": "model weights or config (model.path / model.adapter / model.modules)",
    "tokenizer": "tokenizer",
    "dataset": "training data (data.train)",
    "projection": "projection (projection.dim / seed / kind)",
}


def mismatches(stored: dict, current: dict, keys: tuple[str, ...] = CHECKED) -> list[str]:
    """Human-readable names of the fingerprints that differ."""
    return [WHAT[key] for key in keys if key in current and stored.get(key) != current.get(key)]
