"""Attribution outside the LM store: plain torch models on in-memory tensors, through the same spectral core."""

from engine.attribution.in_memory import (
    Checkpoint,
    Dataset,
    ExampleLoss,
    InMemoryAttribution,
    Segment,
    Settings,
    TrainingRun,
    cross_entropy,
    squared_error,
)

__all__ = [
    "Checkpoint",
    "Dataset",
    "ExampleLoss",
    "InMemoryAttribution",
    "Segment",
    "Settings",
    "TrainingRun",
    "cross_entropy",
    "squared_error",
]
