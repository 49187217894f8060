"""What one query run or request asks, beside the job config.

Declared once: `tributary query`'s options, the service's request body and the query code all read these.
(Pydantic) dataclasses, so they validate like the config and still take positional arguments."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass as options_dataclass
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic_core import PydanticCustomError

from engine.config.json_types import json_types_as_declared
from engine.errors import shown

_OPTIONS = ConfigDict(extra="forbid")

# What a query's measurement may be (engine.capture.measurement computes each); checked here once, for the
# CLI's --measurement, the service's request and the library.
MEASUREMENTS = ("logprob_sum", "logprob_mean", "margin")


def known_measurement(name: str) -> str:
    """`name`, if it is a measurement; else the error every route reports (a pydantic field validator)."""
    if name not in MEASUREMENTS:
        raise PydanticCustomError(
            "unknown_name",
            "unknown measurement {name}; use one of {choices}",
            {"name": shown(name), "choices": ", ".join(MEASUREMENTS)},
        )
    return name


@options_dataclass(frozen=True, config=_OPTIONS)
class GenerationSettings:
    """How the model completes each prompt before its generated tokens are attributed (`--generate`)."""

    _types = json_types_as_declared()

    max_new_tokens: int = Field(default=40, gt=0, description="tokens to generate")
    sample: bool = Field(default=False, description="sample (with seed) instead of greedy decoding")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus mass")
    seed: int = Field(default=0, description="sampling seed (query i uses seed + i)")
    chat: bool | None = Field(
        default=None, description="wrap the prompt in the chat template (default: when the tokenizer has one)"
    )

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@options_dataclass(frozen=True, config=_OPTIONS)
class QueryOptions:
    """What is attributed and what the results carry (the method is the config's, or the one named)."""

    _types = json_types_as_declared()

    k: int = Field(default=10, gt=0, description="supporting (and opposing) training examples per query")
    measurement: str = Field(
        default="logprob_sum", description="logprob_sum | logprob_mean | margin of the completion tokens"
    )
    per_module: bool = Field(default=False, description="per-module scores in the results")
    per_token: bool = Field(default=False, description="each completion token's share of each score")
    generation: GenerationSettings | None = Field(
        default=None, description="complete each prompt with the model first, then attribute the generated tokens"
    )
    approximate: bool = Field(
        default=False,
        description="rank with the ANN index beside the store (`tributary ann build STORE`); methods other than "
        "grad_dot, grad_cos, if and one-segment source scan exactly",
    )
    rerank: int = Field(
        default=100,
        ge=0,
        description="with approximate: re-score the index's top (and bottom) N candidates exactly from the stored "
        "rows; 0 keeps the index's quantised scores",
    )

    @field_validator("measurement")
    @classmethod
    def _known_measurement(cls, value: str) -> str:
        return known_measurement(value)


def option_field(options: type, name: str) -> Any:
    """A copy of one option's field (default, bounds, description), for a schema that spells the option its
    own way: the service's `top_k` is QueryOptions.k, and the CLI's flags take their defaults and help."""
    if is_pydantic_dataclass(options):
        return copy.deepcopy(options.__pydantic_fields__[name])
    if isinstance(options, type) and issubclass(options, BaseModel):
        return copy.deepcopy(options.model_fields[name])
    raise TypeError(f"{options!r} is not an options dataclass or model")
