"""Error bodies: every error the service answers is JSON {"error": message, "field"?, "limit"?}."""

from __future__ import annotations

import json


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


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
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
