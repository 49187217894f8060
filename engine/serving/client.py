"""A small Python client of the service (standard library only; one persistent connection per client).

    client = AttributionClient("http://127.0.0.1:8000", token=os.environ.get("TRIBUTARY_TOKEN"))
    results = client.attribute([{"prompt": "the fox eats", "completion": " berries"}], top_k=5)
    results[0]["top_k"][0]  # {"rank": 1, "index": ..., "id": ..., "score": ..., "snippet": ...}

A client is not thread-safe: give each thread its own.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


class ServiceError(Exception):
    """The service answered with an error status; `body` is its JSON error ({"error", "field"?, "limit"?})."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {body.get('error', body)}")
        self.status = status
        self.body = body


class AttributionClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url {url!r}: give http://HOST:PORT")
        self._host, self._port = parts.hostname, parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"AttributionClient(http://{self._host}:{self._port}{self._prefix})"

    def __enter__(self) -> AttributionClient:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, JSON body) of one request; reconnects once if a kept-alive connection was closed."""
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            try:
                self._connection.request(method, self._prefix + path, body=payload, headers=self._headers)
                response = self._connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        try:
            parsed = json.loads(data) if data else {}
        except json.JSONDecodeError:
            parsed = {"error": data.decode(errors="replace")}
        return response.status, parsed

    def _checked(self, method: str, path: str, body: dict | None = None) -> dict:
        status, parsed = self.request(method, path, body)
        if status != 200:
            raise ServiceError(status, parsed)
        return parsed

    def health(self) -> dict:
        return self._checked("GET", "/v1/health")

    def info(self) -> dict:
        return self._checked("GET", "/v1/info")

    def openapi(self) -> dict:
        return self._checked("GET", "/openapi.json")

    def attribute(
        self,
        queries: list[dict],
        top_k: int = 10,
        method: str | None = None,
        measurement: str | None = None,
        generate: bool | dict = False,
    ) -> list[dict]:
        """One result per query: {"id", "top_k": [...], "bottom_k": [...], ...} (see the README)."""
        body: dict = {"queries": queries, "top_k": top_k, "generate": generate}
        if method is not None:
            body["method"] = method
        if measurement is not None:
            body["measurement"] = measurement
        return self._checked("POST", "/v1/attribute", body)["results"]
