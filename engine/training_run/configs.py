"""The job config of one checkpoint of a training run: the run's config with that checkpoint's weights,
its segment's training file and its sub-store (the tokenizer stays the run's: model.tokenizer or model.path).

A checkpoint that is a peft adapter directory (a LoRA fine-tune captured during training, engine.integrations)
keeps the run's base model and replaces model.adapter instead."""

from __future__ import annotations

from pathlib import Path

from engine.config import JobConfig

ADAPTER_CONFIG = "adapter_config.json"


def checkpoint_config(config: JobConfig, weights: str, dataset: str, store_path: str) -> JobConfig:
    weights_field = "adapter" if (Path(weights) / ADAPTER_CONFIG).is_file() else "path"
    return config.derive(
        source=f"checkpoint {weights} of the training run",
        part_of_run=True,
        model={weights_field: weights, "tokenizer": config.model.tokenizer or config.model.path},
        data={"train": dataset},
        store={"path": store_path},
        training_run=None,
    )
