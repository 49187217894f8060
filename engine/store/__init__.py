"""The Zarr v3 gradient store: rows of projected training gradients, per-row metadata, factors, manifest."""

from engine.store.zarr_store import GradientStore

__all__ = ["GradientStore"]
