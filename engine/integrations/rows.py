"""The training rows of a job config as a torch dataset, batched exactly as `tributary index` batches them.

Each batch carries its examples' row indices under `ROW_KEY` (popped by the capture hooks before the model's
forward sees it), so a shuffled, accumulated or distributed training step still knows which stored row
each of its examples is.
"""

from __future__ import annotations

from typing import cast

import torch

from engine.capture.training import ROW_KEY
from engine.config import JobConfig
from engine.data.batching import collate
from engine.data.rows import field_names, read_rows
from engine.data.tokenize import TokenizedRow, tokenize_rows
from engine.model.loading import load_tokenizer


def pad_id_of(tokenizer) -> int:
    """The padding id the index uses (engine.gradients.context)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return cast(int, pad)


class TrainingRows(torch.utils.data.Dataset):
    """data.train of `config`, tokenised as the index tokenises it; `collate` pads a list of its items."""

    def __init__(self, config: JobConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or load_tokenizer(
            config.model.tokenizer or config.model.path, config.model.trust_remote_code
        )
        self.source = read_rows(config.data.train, field_names(config), what="data.train")
        self.rows: list[TokenizedRow] = tokenize_rows(
            self.source, self.tokenizer, config.data.max_length, config.data.train
        )
        self.pad_id = pad_id_of(self.tokenizer)

    @property
    def ids(self) -> list[str]:
        return [row.id for row in self.source]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> TokenizedRow:
        return self.rows[index]

    def collate(self, rows: list[TokenizedRow], with_rows: bool = True) -> dict[str, torch.Tensor]:
        """model(**batch) keywords; `with_rows` False leaves out the row indices (training without capture)."""
        batch = collate(rows, self.pad_id, self.config.data.padding_side)
        out = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "labels": batch.labels,
        }
        if with_rows:
            out[ROW_KEY] = torch.tensor(batch.indices, dtype=torch.long)
        return out

    def plain_collate(self, rows: list[TokenizedRow]) -> dict[str, torch.Tensor]:
        return self.collate(rows, with_rows=False)
