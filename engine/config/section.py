"""The base of every config section: frozen, and an unknown key is an error that names it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from engine.config.json_types import json_types_as_declared


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _types = json_types_as_declared(numbers_as_text=True)
