"""Checks of an index's inputs that run before any model loads or anything is written."""

from __future__ import annotations

from engine.config import JobConfig
from engine.data.rows import Row, field_names, read_rows
from engine.data.tokenize import tokenize_rows
from engine.model.loading import checked_tokenizer, load_tokenizer


def validated_rows(config: JobConfig) -> list[Row]:
    """Read and tokenise every training row before anything is loaded or written (errors name file:line)."""
    tokenizer = (
        checked_tokenizer(config.model.path)
        if config.model.tokenizer is None
        else load_tokenizer(config.model.tokenizer)
    )
    rows = read_rows(config.data.train, field_names(config), what="data.train")
    tokenize_rows(rows, tokenizer, config.data.max_length, config.data.train)
    return rows
