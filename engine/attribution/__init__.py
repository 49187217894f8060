"""Attribution outside the LM store: plain torch models on in-memory tensors, through the same spectral core."""

from engine.attribution.in_memory import InMemoryAttribution
from engine.attribution.inputs import Checkpoint, Dataset, Segment, Settings, TrainingRun
from engine.attribution.losses import ExampleLoss, cross_entropy, squared_error

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
