"""Pad tokenised rows into a batch with an attention mask and explicit position ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.labels import IGNORE
from engine.data.tokenize import TokenizedRow


@dataclass
class Batch:
    indices: list[int]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens
    position_ids: torch.Tensor  # (B, T), counted over real tokens only, so padding side does not matter
    labels: torch.Tensor  # (B, T), IGNORE for prompt and padding

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.indices,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
        )

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)


def collate(rows: list[TokenizedRow], pad_id: int, padding_side: str = "right") -> Batch:
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[b, span] = torch.tensor(row.input_ids)
        labels[b, span] = torch.tensor(row.labels)
        mask[b, span] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch([row.index for row in rows], ids, mask, positions, labels)


def batches(rows: list[TokenizedRow], batch_size: int, pad_id: int, padding_side: str = "right"):
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start : start + batch_size], pad_id, padding_side)
