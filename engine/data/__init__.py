"""Training and query rows: reading JSONL, tokenising with a loss mask, padding into batches."""
