"""Optional bearer-token auth: the token comes from an environment variable or a file on the replica's node.

Only a SHA-256 digest of the token is kept in memory after start-up, and a presented token is compared
with it in constant time (hmac.compare_digest on equal-length digests). The token never appears in a
log line or an error message: errors name the setting, never its value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from engine.config import ServeConfig
from engine.errors import TributaryError
from engine.serving.responses import send_json

OPEN_PATHS = frozenset({"/v1/health"})


def read_token(serve: ServeConfig) -> str | None:
    """The configured token, or None when auth is off; a configured but missing or empty token is an error."""
    if serve.auth_token_env is not None:
        token = os.environ.get(serve.auth_token_env, "").strip()
        if not token:
            raise TributaryError(
                f"serve.auth_token_env names {serve.auth_token_env}, which is unset or empty where the service "
                "runs; export it (on every node that runs a replica) or remove the setting"
            )
        return token
    if serve.auth_token_file is not None:
        path = Path(serve.auth_token_file)
        if not path.is_file():
            raise TributaryError(f"serve.auth_token_file {path} does not exist; write the token there or fix the path")
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise TributaryError(f"serve.auth_token_file {path} is empty; write the token into it")
        return token
    return None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def presented_token(authorization: bytes | None) -> str:
    """The token of an `Authorization: Bearer <token>` header ('' when absent or of another scheme)."""
    if not authorization:
        return ""
    scheme, _, value = authorization.decode("latin-1").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def token_matches(authorization: bytes | None, digest: bytes) -> bool:
    return hmac.compare_digest(token_digest(presented_token(authorization)), digest)


def _route(scope) -> str:
    """The path below the application's route prefix (ASGI puts the prefix in both root_path and path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class BearerAuth:
    """ASGI middleware: without the right bearer token every path but /v1/health answers 401."""

    def __init__(self, app, digest: bytes | None):
        self.app = app
        self.digest = digest

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.digest is None or _route(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization")
        if token_matches(authorization, self.digest):
            await self.app(scope, receive, send)
            return
        await send_json(
            send,
            401,
            {"error": "missing or wrong bearer token; send 'Authorization: Bearer <token>'"},
            headers=[(b"www-authenticate", b'Bearer realm="tributary"')],
        )
