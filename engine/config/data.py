"""data: the training rows and how they are read, tokenised and batched."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config.section import Section as _Section


class DataConfig(_Section):
    train: str = Field(description="training JSONL: rows {text}, {prompt, completion} or {messages}, optional id")
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = Field(
        default="messages",
        description="chat rows: a list of {role: system|user|assistant, content}, rendered with the "
        "tokenizer's chat template; only assistant tokens carry loss",
    )
    id_field: str = "id"
    max_length: int = Field(default=512, gt=1)
    batch_size: int = Field(default=8, gt=0)
    padding_side: Literal["right", "left"] = "right"
    on_nonfinite: Literal["error", "skip"] = Field(
        default="error",
        description="a training row whose gradient, loss or curvature statistics are NaN/inf: error (stop, naming "
        "the row and modules) or skip (store it as zeros, leave it out of the curvature sums and of every ranking, "
        "and list it in the manifest's `skipped`)",
    )
