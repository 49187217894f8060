"""Tiny Llamas that are NaN where a test wants them (a weight, or the embeddings of some words), and the row files
and skip configs the non-finite tests index with them."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.testing.tiny import save_tiny
from tests.conftest import SENTENCES, job_config, vocabulary_texts, write_jsonl

NAN_WORDS = ("owl", "otter")  # SENTENCES[1] and SENTENCES[3]: the rows a NaN embedding of these words spoils
SKIPPED_IDS = ["t1", "t3"]


def edited_model(directory: Path, edit, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny Llama (untied embeddings: a NaN embedding row spoils only the rows holding that word) after `edit`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny(directory, "llama", vocabulary_texts(), hidden=8, layers=2, heads=2, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        edit(model, tokenizer)
    model.to(dtype).save_pretrained(path)  # pyright: ignore[reportArgumentType] (PreTrainedModel.to is typed through functools.wraps)
    return path


def nan_word_model_in(directory: Path) -> Path:
    """The tiny Llama whose embeddings of NAN_WORDS are NaN: the rows holding those words are non-finite."""

    def nan_words(model, tokenizer):
        for word in NAN_WORDS:
            (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
            model.model.embed_tokens.weight[token] = float("nan")

    return edited_model(directory, nan_words)


def rows_file(tmp_path: Path, sentences: list[tuple[str, str]], name: str = "train.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"id": row_id, "text": text} for row_id, text in sentences])


def all_rows(tmp_path: Path) -> Path:
    return rows_file(tmp_path, [(f"t{i}", s) for i, s in enumerate(SENTENCES)])


def skip_config(tmp_path: Path, model: Path, train: Path, store: str, **sections) -> dict:
    raw = job_config(tmp_path, model, train, curvature={"strategy": "ekfac", "fisher": "empirical"}, **sections)
    raw["data"]["on_nonfinite"] = "skip"
    raw["store"].update(path=str(tmp_path / store), rows_per_chunk=3)
    return raw
