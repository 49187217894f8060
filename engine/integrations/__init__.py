"""Capture while training: a transformers.Trainer callback and a step API for plain torch / accelerate loops,
writing a training-run store from the training backward itself (no index pass)."""

from engine.integrations.callback import TributaryCallback
from engine.integrations.capture import TrainingCapture
from engine.integrations.rows import TrainingRows

__all__ = ["TrainingCapture", "TrainingRows", "TributaryCallback"]
