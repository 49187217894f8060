"""Request and response bodies of the HTTP API. FastAPI validates requests with these models (a malformed
body is a 422 naming the field) and publishes them in the OpenAPI document at /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.config import GenerationSettings, QueryOptions, json_types_as_declared, option_field
from engine.query.records import QueryAttribution


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _types = json_types_as_declared()


class QueryIn(_Body):
    prompt: str = Field(min_length=1, description="the prompt (tokenised with the tokenizer's special tokens)")
    completion: str | None = Field(
        default=None,
        min_length=1,
        description="the text whose log-probability given the prompt is attributed; "
        "omit it with `generate`, where the model writes it",
    )
    id: str | None = Field(
        default=None, max_length=256, description="echoed in the result; default: the query's position"
    )


class AttributeRequest(_Body):
    queries: list[QueryIn] = Field(min_length=1, description="at most serve.max_queries_per_request")
    top_k: int = option_field(QueryOptions, "k")
    method: str | None = Field(
        default=None, description="attribution method (GET /v1/info lists them); default: the config's method.name"
    )
    measurement: str = option_field(QueryOptions, "measurement")
    generate: GenerationSettings | bool = Field(
        default=False,
        description="complete each prompt with the model first, then attribute the generated tokens; "
        "true for the defaults",
    )

    def generation(self) -> GenerationSettings | None:
        if self.generate is True:
            return GenerationSettings()
        return self.generate or None

    def options(self) -> QueryOptions:
        """What the request asks of the query code (its method is resolved against the config apart)."""
        return QueryOptions(k=self.top_k, measurement=self.measurement, generation=self.generation())


class AttributeResponse(BaseModel):
    results: list[QueryAttribution] = Field(description="one per query, in request order")


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    limit: float | None = None
