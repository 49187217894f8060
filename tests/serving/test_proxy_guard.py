"""The proxy middleware that turns "the replica died holding this request" into a 503 with Retry-After.

Serve's proxy, on a RayActorError, sends no ASGI message at all (ray.serve._private.http_util
send_http_response_on_exception sends a body only for 408/429/503) and uvicorn then writes a bare 500.
The apps below do exactly that, or raise, or answer normally; the live kill is tests/e2e/test_replica_crash.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.middleware import Middleware

from engine.serving.proxy_guard import CALLBACK, NoAnswerIsUnavailable, proxy_middlewares


def call(app, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(NoAnswerIsUnavailable(app)({"type": scope_type}, receive, send))
    return sent


async def sends_nothing(scope, receive, send) -> None:  # the proxy after a RayActorError
    return None


async def raises(scope, receive, send) -> None:
    raise RuntimeError("replica died")


async def answers(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": b'{"error": "the scoring pass failed"}'})


@pytest.mark.parametrize("app", [sends_nothing, raises], ids=["no-answer", "raised"])
def test_no_answer_is_a_503_with_retry_after_in_the_error_shape(app):
    start, body = call(app)
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert int(headers[b"retry-after"]) >= 1
    assert headers[b"content-type"] == b"application/json"
    error = json.loads(body["body"])
    assert set(error) == {"error"} and "retry" in error["error"]


def test_a_started_answer_passes_through_untouched():
    assert call(answers) == [
        {"type": "http.response.start", "status": 500, "headers": []},
        {"type": "http.response.body", "body": b'{"error": "the scoring pass failed"}'},
    ]


def test_a_failure_after_the_answer_started_is_not_hidden():
    async def fails_midway(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("broken stream")

    with pytest.raises(RuntimeError, match="broken stream"):
        call(fails_midway)


def test_other_protocols_are_not_touched():
    assert call(sends_nothing, "websocket") == []


def test_serve_finds_the_callback_by_its_import_path():
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    assert CALLBACK.rsplit(".", 1)[1] == proxy_middlewares.__name__
    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(CALLBACK))
    assert [m.cls for m in middlewares if isinstance(m, Middleware)] == [NoAnswerIsUnavailable]
