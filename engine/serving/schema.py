"""Request and response bodies of the HTTP API. FastAPI validates requests with these models (a malformed
body is a 422 naming the field) and publishes them in the OpenAPI document at /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.query.generate import GenerationSettings


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class GenerateIn(_Body):
    max_new_tokens: int = Field(default=40, gt=0)
    sample: bool = Field(
        default=False, description="sample with `seed` (query i uses seed + i) instead of greedy decoding"
    )
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    chat: bool | None = Field(
        default=None, description="wrap the prompt in the chat template (default: when the tokenizer has one)"
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
    top_k: int = Field(default=10, gt=0, description="supporting (and opposing) training examples per query")
    method: str | None = Field(
        default=None, description="attribution method (GET /v1/info lists them); default: the config's method.name"
    )
    measurement: str = Field(default="logprob_sum", description="logprob_sum | logprob_mean | margin")
    generate: GenerateIn | bool = Field(
        default=False,
        description="complete each prompt with the model first, then attribute the generated tokens; "
        "true for the defaults",
    )

    def generation(self) -> GenerateIn | None:
        if self.generate is True:
            return GenerateIn()
        return self.generate or None


class TrainingExample(BaseModel):
    rank: int
    index: int = Field(description="row of the training file (0-based)")
    id: str
    score: float = Field(description="positive: the example supports the query")
    snippet: str | None = Field(
        default=None, description="the start of the training text (absent when data.train is not the indexed file)"
    )


class QueryAttribution(BaseModel):
    query: int
    id: str
    method: str
    measurement: str
    generated: bool
    prompt: str | None = None
    completion: str | None = None
    completion_tokens: list[str]
    top_k: list[TrainingExample] = Field(description="most supporting first")
    bottom_k: list[TrainingExample] = Field(description="most opposing (most negative score) first")


class AttributeResponse(BaseModel):
    results: list[QueryAttribution] = Field(description="one per query, in request order")


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    limit: float | None = None
