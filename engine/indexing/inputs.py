"""Checks of an index's inputs that run before any model loads or anything is written."""

from __future__ import annotations

from itertools import islice

from engine.config import JobConfig
from engine.data.rows import field_names, iter_rows
from engine.data.tokenize import tokenize_rows
from engine.errors import TributaryError
from engine.model.loading import checked_tokenizer, load_tokenizer, model_vocabulary_size, refuse_remote_code

ROWS_PER_CHECK = 1024  # rows read and tokenised at a time: Parquet/Arrow inputs are never held whole


def validated_row_count(config: JobConfig) -> int:
    """Read and tokenise every training row before anything is loaded or written (errors name file:line, or
    file and row); the number of rows."""
    trust = config.model.trust_remote_code
    refuse_remote_code(config.model.path, trust)
    tokenizer = (
        checked_tokenizer(config.model.path, trust)
        if config.model.tokenizer is None
        else load_tokenizer(config.model.tokenizer, trust)
    )
    vocabulary = model_vocabulary_size(config.model.path)
    rows = iter_rows(config.data.train, field_names(config), what="data.train")
    count = 0
    while batch := list(islice(rows, ROWS_PER_CHECK)):
        tokenize_rows(batch, tokenizer, config.data.max_length, config.data.train, vocab_size=vocabulary)
        count += len(batch)
    if count == 0:
        raise TributaryError(f"data.train {config.data.train} has no rows")
    return count
