"""The job config of one checkpoint of a training run: the run's config with that checkpoint's weights,
its segment's training file and its sub-store (the tokenizer stays the run's: model.tokenizer or model.path)."""

from __future__ import annotations

from engine.config import JobConfig


def checkpoint_config(config: JobConfig, weights: str, dataset: str, store_path: str) -> JobConfig:
    return config.derive(
        source=f"checkpoint {weights} of the training run",
        part_of_run=True,
        model={"path": weights, "tokenizer": config.model.tokenizer or config.model.path},
        data={"train": dataset},
        store={"path": store_path},
        training_run=None,
    )
