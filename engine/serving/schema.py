"""Request and response bodies of the HTTP API. FastAPI validates requests with these models (a malformed
body is a 422 naming the field) and publishes them in the OpenAPI document at /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.query.generate import GenerationSettings
from engine.query.records import QueryAttribution


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryIn(_Body):
    prompt: str = Field(min_length=1, description="the prompt (tokenised with the tokenizer's special tokens)")
    completion: str | None = Field(
        None,
        min_length=1,
        description="the text whose log-probability given the prompt is attributed; "
        "omit it with `generate`, where the model writes it",
    )
    id: str | None = Field(None, max_length=256, description="echoed in the result; default: the query's position")


class GenerateIn(_Body):
    max_new_tokens: int = Field(40, gt=0)
    sample: bool = Field(False, description="sample with `seed` (query i uses seed + i) instead of greedy decoding")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    chat: bool | None = Field(
        None, description="wrap the prompt in the chat template (default: when the tokenizer has one)"
    )

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            sample=self.sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            chat=self.chat,
        )


class AttributeRequest(_Body):
    queries: list[QueryIn] = Field(min_length=1, description="at most serve.max_queries_per_request")
    top_k: int = Field(10, gt=0, description="supporting (and opposing) training examples per query")
    method: str | None = Field(
        None, description="attribution method (GET /v1/info lists them); default: the config's method.name"
    )
    measurement: str = Field("logprob_sum", description="logprob_sum | logprob_mean | margin")
    generate: GenerateIn | bool = Field(
        False,
        description="complete each prompt with the model first, then attribute the generated tokens; "
        "true for the defaults",
    )

    def generation(self) -> GenerateIn | None:
        if self.generate is True:
            return GenerateIn()
        return self.generate or None


class AttributeResponse(BaseModel):
    results: list[QueryAttribution] = Field(description="one per query, in request order")


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    limit: float | None = None
