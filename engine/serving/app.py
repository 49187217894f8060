"""The Serve deployment: each replica loads the store, model and factors once (an Attributor) and answers
concurrent requests in batches, one scoring pass per batch.

Requests are validated and tokenised as they arrive (validation.py), then wait in the pass queue
(batching.py): when the scorer is free, the next pass takes every waiting request (up to
serve.batch_max_queries queries) and runs in a worker thread, so requests keep arriving and queue for the
pass after meanwhile. With a `cluster` section the
store's rows are split into contiguous ranges, each scored by one `RowRangeScorer` deployment that every
replica sends its batches to (the sharding of `tributary query` on a cluster, engine/query/row_range.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.config import MEASUREMENTS, JobConfig, QueryOptions, method_names
from engine.errors import TributaryError, shown_name
from engine.query.attributor import Attributor, QueryGroup
from engine.query.row_range import RowRangeScorer, merge_parts
from engine.query.scoring import QueryResult
from engine.serving.auth import BearerAuth, read_token, token_digest
from engine.serving.batching import PassQueue
from engine.serving.plan import ServePlan, resolve_serve_plan
from engine.serving.rescore import BatchRescorer, candidate_options
from engine.serving.responses import RequestError, refusal_of_http_error
from engine.serving.schema import AttributeRequest, AttributeResponse, ErrorBody
from engine.serving.validation import BodyLimit, Limits, PreparedRequest, prepare
from engine.store import GradientStore
from engine.store.identity import StoreChanged
from engine.store.summary import manifest_summary

log = logging.getLogger(__name__)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "unknown method or measurement"),
        (401, "missing or wrong bearer token (when auth is on)"),
        (413, "too many queries, too long a prompt, or too large a body (the limit is in the body)"),
        (422, "malformed body (the field is named)"),
        (500, "the scoring pass failed"),
        (503, "the store was replaced, removed or is being rewritten since the service loaded it"),
        (504, "not answered within serve.request_timeout_s"),
    )
}


class ShardedScan:
    """A scoring pass on the shared row-range scorers: each scores its rows, this replica merges them."""

    def __init__(self, scorers: list):
        self.scorers = scorers

    def __call__(self, transformed: np.ndarray, normalise: bool, k: int, full: bool) -> QueryResult:
        responses = [scorer.score.remote(transformed, normalise, k, full) for scorer in self.scorers]
        return merge_parts([response.result() for response in responses], k, full)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # the API built in-process around a replica (tests), not in a Serve deployment
        return "in-process"


def _queries_in(items: list[PreparedRequest]) -> int:
    return sum(item.size for item in items)


@serve.deployment(name="attribution")
@serve.ingress()
class AttributionService:
    def __init__(self, plan: ServePlan | JobConfig, range_scorers: list | None = None):
        """`plan`: as engine.serving.service resolved it once; a config is resolved here (a replica built in
        this process, as tests do)."""
        import torch

        plan = plan if isinstance(plan, ServePlan) else resolve_serve_plan(plan)
        config = plan.config
        torch.set_num_threads(max(1, int(config.serve.replica_cpus)))
        self.config = config
        self.limits = Limits.from_config(config)
        token = read_token(config.serve)  # only its digest is kept
        self._digest = None if token is None else token_digest(token)
        scan = ShardedScan(range_scorers) if range_scorers else None
        final = (plan.final_config, GradientStore.open(plan.final_store))
        self.attributor = Attributor.load(config, scan=scan, final=final, method=plan.method)
        if config.serve.approximate:
            self.attributor.ann_index()  # a missing or stale index fails the replica's start, not a request
        self.rescorer = BatchRescorer(self.attributor) if config.serve.rescore is not None else None
        self.request_tokenizer = copy.deepcopy(self.attributor.context.tokenizer)  # for the event loop's use
        self.counts = {"requests": 0, "queries": 0, "batches": 0, "rejected": 0, "timed_out": 0}
        self.passes = PassQueue(
            self._score_batch,
            size=lambda item: item.size,
            max_size=config.serve.batch_max_queries,
            wait_s=config.serve.batch_wait_s,
        )

    def __serve_build_asgi_app__(self):
        return build_api(self)

    # ---- endpoints ----------------------------------------------------------------------------------
    async def attribute(self, request: AttributeRequest) -> dict:
        try:
            prepared = prepare(request, self.attributor, self.limits, self.request_tokenizer)
        except RequestError:
            self.counts["rejected"] += 1
            raise
        timeout = self.config.serve.request_timeout_s
        try:
            outcome = await asyncio.wait_for(self.passes.submit(prepared), timeout)
        except asyncio.TimeoutError:
            self.counts["timed_out"] += 1
            raise RequestError(
                504,
                f"not answered within serve.request_timeout_s = {timeout} s; retry later, send "
                "fewer queries, or raise the limit",
            ) from None
        if isinstance(outcome, RequestError):
            raise outcome
        return {"results": outcome}

    def info(self) -> dict:
        attributor, serving = self.attributor, self.config.serve
        try:  # the summary below is of the store as loaded: never describe it as the one there now
            attributor.check_store_unchanged()
        except StoreChanged as error:
            raise RequestError(503, str(error)) from None
        ranges = len(attributor.scan.scorers) if isinstance(attributor.scan, ShardedScan) else 0
        replica = _replica_id()
        return {
            "service": {"version": __version__, "auth": self._digest is not None},
            "store": manifest_summary(attributor.store),
            "model": {
                "path": self.config.model.path,
                "adapter": self.config.model.adapter,
                "adapter_mode": self.config.model.adapter_mode,
            },
            "methods": {"default": self.config.method.name, "available": list(method_names())},
            "measurements": list(MEASUREMENTS),
            "limits": dict(self.limits.describe(), request_timeout_s=serving.request_timeout_s),
            "batching": {
                "batch_max_queries": serving.batch_max_queries,
                "batch_wait_s": serving.batch_wait_s,
                "row_ranges": ranges,
                "rescore": serving.rescore,
            },
            "replica": dict(self.counts, id=replica, scoring_passes=attributor.scoring_passes),
        }

    # ---- batching -----------------------------------------------------------------------------------
    def _score_alone(self, group: QueryGroup, options: QueryOptions):
        """One request's records, or the 422 refusal naming what the engine refused in it."""
        try:
            return self._records([group], self.attributor.attribute([group]), [options])[0]
        except StoreChanged as error:
            return RequestError(503, str(error))
        except TributaryError as error:
            return RequestError(422, str(error), "queries")

    def _score_batch(self, items: list[PreparedRequest]) -> list:
        """Each request's records, or the RequestError that answers it; one scoring pass for all of them."""
        outcomes: list = [None] * len(items)
        groups, members = [], []
        for i, item in enumerate(items):
            queries = item.queries
            if item.prompts is not None:
                if item.generation is None:
                    raise RuntimeError("a request with prompts to complete carries its generation settings")
                try:
                    queries = self.attributor.generated_queries(item.prompts, item.generation, "queries")
                except Exception as error:  # one request's generation must not fail the batch
                    outcomes[i] = RequestError(422, f"generation failed: {error}", "queries")
                    continue
            if queries is None:
                raise RuntimeError("a prepared request has either queries or prompts")
            rescore = self.config.serve.rescore
            options = item.options if rescore is None else candidate_options(item.options, rescore)
            groups.append(QueryGroup(queries, options, item.method))
            members.append(i)
        if groups:
            try:
                answers = self._records(groups, self.attributor.attribute(groups), [items[i].options for i in members])
            except StoreChanged as error:  # never answer with the old store's ids and factors over new rows
                log.error("%s", error)
                for i in members:
                    outcomes[i] = RequestError(503, str(error))
            except TributaryError:  # a request the engine refuses (a non-finite query): refuse it, score the rest
                for i, group in zip(members, groups):
                    outcomes[i] = self._score_alone(group, items[i].options)
            except Exception as error:
                log.exception("a scoring pass over %d requests failed", len(groups))
                for i in members:
                    outcomes[i] = RequestError(
                        500,
                        f"the scoring pass failed ({type(error).__name__}: {error}); "
                        "the service keeps running, retry the request",
                    )
            else:
                for i, answer in zip(members, answers):
                    outcomes[i] = answer
        self.counts["batches"] += 1
        self.counts["requests"] += len(items)
        self.counts["queries"] += _queries_in(items)
        return outcomes

    def _records(self, groups: list[QueryGroup], results: list[QueryResult], options: list[QueryOptions]) -> list:
        """Each group's records: the store's, or with serve.rescore its candidates re-scored exactly."""
        if self.rescorer is None:
            return [result.records for result in results]
        return self.rescorer.records(groups, results, options)


class ApiService(Protocol):
    """What the HTTP API needs of its service: AttributionService's instances (the name itself is a Ray
    Deployment once decorated)."""

    limits: Limits
    _digest: bytes | None

    def info(self) -> dict: ...

    async def attribute(self, request: AttributeRequest) -> dict: ...


def build_api(service: ApiService) -> FastAPI:
    """The replica's HTTP API: routes bound to this replica's service, with auth and a body limit around."""
    api = FastAPI(
        title="Tributary",
        version=__version__,
        description="Which training examples made this model say this? Send queries (prompt and "
        "completion), get the training examples that most support and oppose each.",
    )

    @api.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @api.exception_handler(StarletteHTTPException)
    async def starlette_refused(_: Request, error: StarletteHTTPException) -> JSONResponse:
        refusal = refusal_of_http_error(error.status_code, error.detail, error.__cause__)
        return JSONResponse(refusal.body(), status_code=refusal.status, headers=error.headers)

    @api.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:  # a bug, answered in the same shape
        log.error("request failed", exc_info=error)
        message = f"internal error ({type(error).__name__}); the service keeps running, retry the request"
        return JSONResponse(RequestError(500, message).body(), status_code=500)

    @api.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        fields = [
            "body"
            if problem["type"] == "json_invalid"
            else shown_name(".".join(str(part) for part in problem["loc"] if part != "body")) or "body"
            for problem in problems
        ]
        message = "; ".join(f"{field}: {problem['msg']}" for field, problem in zip(fields, problems))
        return JSONResponse({"error": message, "field": fields[0] if fields else "body"}, status_code=422)

    @api.get("/v1/health", summary="Liveness (never needs a token)")
    async def health() -> dict:
        return {"status": "ok"}

    @api.get(
        "/v1/info",
        summary="The store's manifest summary, methods, limits and this replica's counters",
        responses={status: ERROR_RESPONSES[status] for status in (401, 503)},
    )
    async def info() -> dict:
        return service.info()

    @api.post(
        "/v1/attribute",
        response_model=AttributeResponse,
        response_model_exclude_none=True,
        summary="Top supporting and opposing training examples of each query",
        responses=ERROR_RESPONSES,
    )
    async def attribute(request: AttributeRequest) -> dict:
        return await service.attribute(request)

    api.add_middleware(BodyLimit, max_bytes=service.limits.max_request_bytes)
    api.add_middleware(BearerAuth, digest=service._digest)  # outermost: nothing runs before the token check
    return api


# The scorers of one contiguous row range of the store each (one replica per range, shared by every
# service replica): engine/query/row_range.py's RowRangeScorer as a deployment.
def range_scorer_deployment():
    return serve.deployment(RowRangeScorer)
