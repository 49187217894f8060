"""Logical row dtypes and how they are kept on disk (Zarr 3 has no bfloat16: it is kept as uint16)."""

from __future__ import annotations

import numpy as np
import torch

PHYSICAL = {"float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def encode(rows: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    tensor = torch.as_tensor(rows)
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows in float32 (float64 when stored so); the scorer does float64 arithmetic."""
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()
    return raw if dtype == "float64" else raw.astype(np.float32, copy=False)
