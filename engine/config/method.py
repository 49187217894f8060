"""method: the declared attribution methods and the section that picks one."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from engine.config.section import Section as _Section
from engine.errors import shown


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method as the layers below its implementation see it. Every method is declared here, once: the
    config schema, `tributary query --method`, the service's validation and `engine.evaluation` read this
    list, and engine/spectral/methods.py registers one implementation per name (a test checks both sets
    and the README's methods table agree)."""

    name: str
    training_run: bool  # scores along the training run's checkpoints (the others score the final model)


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("grad_dot", training_run=False),
    MethodSpec("grad_cos", training_run=False),
    MethodSpec("if", training_run=False),
    MethodSpec("source", training_run=True),
    MethodSpec("fast_source", training_run=True),
    MethodSpec("tracin", training_run=True),
    MethodSpec("trak", training_run=False),
    MethodSpec("datainf", training_run=False),
)


def method_names() -> tuple[str, ...]:
    """Every method a config (and a request) may name: the values `method.name` accepts."""
    return tuple(spec.name for spec in METHODS)


def unknown_method(name: object) -> str:
    """The message for a method name nobody declared, naming every one that is."""
    return f"unknown method {shown(name)}; use one of {', '.join(method_names())}"


class MethodConfig(_Section):
    name: str = Field(
        default="if",
        description=f"the attribution method: {' | '.join(method_names())}",
        json_schema_extra={"enum": list(method_names())},
    )
    damping: float | None = Field(
        default=None,
        ge=0,
        description="if / trak: damping (null = 0.1 x mean eigenvalue per module); datainf: λ for "
        "every module (null = 0.1 x mean squared gradient norm / width, per module)",
    )
    eta: float | None = Field(default=None, gt=0, description="Source, one segment: mean learning rate of the segment")
    steps: int | None = Field(default=None, gt=0, description="Source, one segment: number of optimizer steps K")
    form: Literal["exponential", "discrete"] = Field(
        default="exponential", description="Source: (1-exp(-eta K l))/l, or the K-step form (1-(1-eta l)^K)/l"
    )

    @field_validator("name")
    @classmethod
    def _declared(cls, value: str) -> str:
        if value not in method_names():
            raise PydanticCustomError("unknown_method", "{message}", {"message": unknown_method(value)})
        return value
