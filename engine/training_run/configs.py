"""The job config of one checkpoint of a training run: the run's config with that checkpoint's weights,
its segment's training file and its sub-store (the tokenizer stays the run's: model.tokenizer or model.path)."""

from __future__ import annotations

from engine.config import JobConfig


def checkpoint_config(config: JobConfig, weights: str, dataset: str, store_path: str) -> JobConfig:
    model = config.model.model_copy(update={"path": weights, "tokenizer": config.model.tokenizer or config.model.path})
    data = config.data.model_copy(update={"train": dataset})
    store = config.store.model_copy(update={"path": store_path})
    return config.model_copy(update={"model": model, "data": data, "store": store, "training_run": None})
