"""Error bodies: every error the service answers is JSON {"error": message, "field"?, "limit"?}."""

from __future__ import annotations

import json
from collections.abc import Sequence


class RequestError(Exception):
    """A request the service refuses (or could not answer), with the HTTP status to answer it with."""

    def __init__(self, status: int, message: str, field: str | None = None, limit: int | float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.limit = limit

    def body(self) -> dict:
        body: dict = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.limit is not None:
            body["limit"] = self.limit
        return body


def refusal_of_http_error(status: int, detail: object, cause: BaseException | None) -> RequestError:
    """Our refusal for an error Starlette or FastAPI raised themselves (unknown path, wrong method, a body
    that does not parse), which they would answer with {"detail": ...}.

    FastAPI turns a body it cannot decode (bytes that are not UTF-8, JSON nested deeper than Python's
    recursion limit) into a 400 whose cause is the decoding error: that is a malformed body, 422.
    """
    if isinstance(cause, UnicodeDecodeError):
        return RequestError(
            422, f"body: not valid UTF-8 (byte {cause.object[cause.start]:#04x} at offset {cause.start})", "body"
        )
    if isinstance(cause, RecursionError):
        return RequestError(422, "body: JSON nested too deeply to parse", "body")
    if status == 400 and cause is not None:
        return RequestError(422, f"body: could not be parsed ({type(cause).__name__})", "body")
    return RequestError(status, detail if isinstance(detail, str) else json.dumps(detail))


async def send_json(send, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer an ASGI HTTP request with a JSON body (for middleware that answers before the app does)."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
