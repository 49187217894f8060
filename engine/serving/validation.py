"""Checks a request passes before it joins a batch: size limits (413), method and measurement (400), and
fields that only make sense together (422). What passes is tokenised here, so a batch never fails on
one request's bad input."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from pydantic import ValidationError

from engine.config import GenerationSettings, JobConfig, QueryOptions, method_names, unknown_method
from engine.data.rows import Row
from engine.errors import TributaryError, shown
from engine.query.attributor import Attributor
from engine.query.generate import PromptRow
from engine.query.records import Query
from engine.serving.responses import RequestError, send_json
from engine.serving.schema import AttributeRequest
from engine.spectral.methods import Method


@dataclass(frozen=True)
class Limits:
    """What a request may ask: the serve section's limits under their own names, max_prompt_tokens resolved
    (its default is data.max_length - 1)."""

    max_queries_per_request: int
    max_prompt_chars: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_top_k: int
    max_request_bytes: int

    @classmethod
    def from_config(cls, config: JobConfig) -> Limits:
        serve = config.serve
        values = {field.name: getattr(serve, field.name) for field in fields(cls)}
        return cls(**dict(values, max_prompt_tokens=serve.max_prompt_tokens or config.data.max_length - 1))

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class PreparedRequest:
    """A validated request: tokenised queries, or prompts the model completes inside the batch."""

    options: QueryOptions
    method: Method
    queries: list[Query] | None = None
    prompts: list[PromptRow] | None = None
    generation: GenerationSettings | None = None

    @property
    def size(self) -> int:
        if self.queries is not None:
            return len(self.queries)
        if self.prompts is not None:
            return len(self.prompts)
        raise RuntimeError("a prepared request has either queries or prompts")


def _check_sizes(request: AttributeRequest, limits: Limits) -> None:
    if len(request.queries) > limits.max_queries_per_request:
        raise RequestError(
            413,
            f"{len(request.queries)} queries in one request; at most {limits.max_queries_per_request} "
            "(serve.max_queries_per_request): split the request",
            "queries",
            limits.max_queries_per_request,
        )
    for i, query in enumerate(request.queries):
        for name in ("prompt", "completion"):
            text = getattr(query, name)
            if text is not None and len(text) > limits.max_prompt_chars:
                raise RequestError(
                    413,
                    f"queries.{i}.{name} is {len(text)} characters; at most {limits.max_prompt_chars} "
                    "(serve.max_prompt_chars)",
                    f"queries.{i}.{name}",
                    limits.max_prompt_chars,
                )
    if request.top_k > limits.max_top_k:
        raise RequestError(
            422,
            f"top_k {request.top_k} is above serve.max_top_k = {limits.max_top_k}",
            "top_k",
            limits.max_top_k,
        )
    generation = request.generation()
    if generation is not None and generation.max_new_tokens > limits.max_new_tokens:
        raise RequestError(
            413,
            f"generate.max_new_tokens {generation.max_new_tokens} is above serve.max_new_tokens "
            f"= {limits.max_new_tokens}",
            "generate.max_new_tokens",
            limits.max_new_tokens,
        )


def _method(request: AttributeRequest, attributor: Attributor) -> Method:
    """The requested method, checked against the declared ones (engine.config.METHODS: a new method needs no
    change here)."""
    if request.method is not None and request.method not in method_names():
        raise RequestError(400, unknown_method(request.method), "method")
    try:
        return attributor.method(request.method, source=f"the service's config with method {shown(request.method)}")
    except TributaryError as error:  # a known method the config cannot run (e.g. source without eta/steps)
        raise RequestError(400, " ".join(str(error).split()), "method") from None


def _check_fields(request: AttributeRequest, tokenizer) -> None:
    try:  # the options a request shares with `tributary query` (measurement) are QueryOptions' to check
        request.options()
    except ValidationError as error:
        item = error.errors()[0]
        raise RequestError(400, item["msg"], ".".join(str(part) for part in item["loc"])) from None
    generation = request.generation()
    seen: dict[str, int] = {}
    for i, query in enumerate(request.queries):
        if generation is None and query.completion is None:
            raise RequestError(
                422, f"queries.{i}.completion is required unless generate is set", f"queries.{i}.completion"
            )
        if generation is not None and query.completion is not None:
            raise RequestError(
                422,
                f"queries.{i}.completion: omit it with generate (the model writes the completion)",
                f"queries.{i}.completion",
            )
        query_id = query.id if query.id is not None else str(i)
        if query_id in seen:
            raise RequestError(
                422, f"queries.{i}.id {query_id!r} is already used by queries.{seen[query_id]}", f"queries.{i}.id"
            )
        seen[query_id] = i
    if generation is not None and generation.chat and not getattr(tokenizer, "chat_template", None):
        raise RequestError(422, "generate.chat is true but the model's tokenizer has no chat template", "generate.chat")


def _check_prompt_tokens(request: AttributeRequest, tokenizer, limits: Limits) -> None:
    for i, query in enumerate(request.queries):
        tokens = len(tokenizer(query.prompt, add_special_tokens=True)["input_ids"])
        if tokens > limits.max_prompt_tokens:
            raise RequestError(
                413,
                f"queries.{i}.prompt is {tokens} tokens; at most {limits.max_prompt_tokens} "
                "(serve.max_prompt_tokens, default data.max_length - 1)",
                f"queries.{i}.prompt",
                limits.max_prompt_tokens,
            )


def prepare(request: AttributeRequest, attributor: Attributor, limits: Limits, tokenizer) -> PreparedRequest:
    """Validate a request in the order cheap to dear; tokenise its queries (not for generate).

    `tokenizer` is the caller's own copy of the model's: a fast tokenizer may refuse concurrent use, and
    a batch may be using the model's own at the same time.
    """
    _check_sizes(request, limits)
    method = _method(request, attributor)
    _check_fields(request, tokenizer)
    _check_prompt_tokens(request, tokenizer, limits)
    options = request.options()
    if attributor.config.serve.approximate:
        options = replace(options, approximate=True)
    ids = [query.id if query.id is not None else str(i) for i, query in enumerate(request.queries)]
    generation = request.generation()
    if generation is not None:
        prompts = [PromptRow(i, ids[i], i, query.prompt) for i, query in enumerate(request.queries)]
        return PreparedRequest(options, method, prompts=prompts, generation=generation)
    queries = []
    for i, query in enumerate(request.queries):
        row = Row(index=i, id=ids[i], line=i, prompt=query.prompt, completion=query.completion)
        try:
            queries.extend(attributor.queries_from_rows([row], source="queries", tokenizer=tokenizer))
        except TributaryError as error:
            raise RequestError(422, str(error), f"queries.{i}") from None
    return PreparedRequest(options, method, queries=queries)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send) -> None:
        await send_json(
            send,
            413,
            RequestError(
                413, f"request body over {self.max_bytes} bytes (serve.max_request_bytes)", "body", self.max_bytes
            ).body(),
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:  # read the whole body (bounded by max_bytes), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
