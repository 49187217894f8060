"""Serve's HTTP proxy, made to answer a request whose replica died with a clean 503 and Retry-After.

When a replica's process dies (SIGKILL, OOM) while it holds requests, or the proxy routes a new request to
it before the controller has noticed, the proxy gets a RayActorError. It answers that with a bare 500 and
no body (uvicorn's "Internal Server Error" text), which tells a client neither that the service is fine
nor when to retry. The other replicas keep answering and Serve starts a replacement within seconds, so
the truthful answer is "unavailable, retry shortly": 503 in the service's error shape, with Retry-After.

Serve applies proxy middleware only through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read in the
proxy's own process: engine.serving.service sets it in the Serve controller's runtime environment, which
the proxies it starts inherit.
"""

from __future__ import annotations

from engine.serving.responses import send_json

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "engine.serving.proxy_guard.proxy_middlewares"
RETRY_AFTER_S = 1
NO_ANSWER = (
    "the replica holding this request stopped before answering (the service is replacing it); "
    f"retry in {RETRY_AFTER_S} s"
)


class NoAnswerIsUnavailable:
    """ASGI middleware: an HTTP request the wrapped app returned (or raised) from without starting a
    response is answered 503 with Retry-After. Responses the app did start pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:
                raise
        if not started:
            await send_json(send, 503, {"error": NO_ANSWER}, [(b"retry-after", str(RETRY_AFTER_S).encode())])


def proxy_middlewares() -> list:
    """The callback Serve's proxy calls (by import path) for the middleware to wrap itself in."""
    from starlette.middleware import Middleware

    return [Middleware(NoAnswerIsUnavailable)]
