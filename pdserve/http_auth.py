"""Who may call what, on the router and on every instance: one ASGI middleware.

Two credentials (docs/DESIGN.md, "Trust model"): the clients' API key, sent as
`Authorization: Bearer <key>`, and the deployment secret, never sent: an internal call
carries `X-PDServe-Auth`, a MAC over its method, path and body (`sign_request`). The
middleware checks the MAC of every request that carries one and tells the app through
`request.state.internal` (True only for a verified internal call), then applies the rules:

- `/health` and `/ping` are open;
- `internal_paths` (the router's `/register`, `/deregister`, `/instances`; an instance's
  `/v1/kv/release`, `/v1/kv/events`) take internal calls only;
- every other route (`/v1/*`, `/metrics`, the docs) needs the API key or an internal MAC,
  where a key is set; `/metrics` stays open with `open_metrics`.

A body is read here only when the request carries a MAC to check; it is then replayed to the
app unchanged, and the connection's later messages (`http.disconnect`) follow as they come.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.security import (
    INTERNAL_AUTH_HEADER,
    DeploymentSecret,
    RequestVerifier,
    bearer_matches,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/ping"})
ROUTER_INTERNAL_PATHS = frozenset({"/register", "/deregister", "/instances"})
INSTANCE_INTERNAL_PATHS = frozenset({"/v1/kv/release", "/v1/kv/events"})
MAX_SIGNED_BODY_BYTES = 64 * 2**20  # a signed body is held in memory to check its MAC
_AUTH_HEADER = INTERNAL_AUTH_HEADER.lower().encode()


@dataclass
class HTTPAuth:
    """The credentials one server checks, and which of its routes are internal-only."""

    api_key: str | None = None  # None: /v1/* and /metrics are open to anyone
    secret: DeploymentSecret | None = None  # None: no call is internal
    open_metrics: bool = False
    internal_paths: frozenset[str] = frozenset()
    verifier: RequestVerifier | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.secret is not None:  # one per process: it remembers nonces to refuse replays
            self.verifier = RequestVerifier(self.secret)

    def refusal(self, path: str, internal: bool, authorization: str | None,
                signed: bool = False) -> tuple[str, str] | None:
        """Why this request may not go on, as (message, code); None: it may. `signed`: it
        carried a MAC, which did not verify."""
        path = path.rstrip("/") or "/"  # "/register/" is "/register" to the app's router
        if path in OPEN_PATHS or internal:
            return None
        bad_mac = ("the X-PDServe-Auth signature is wrong, stale or replayed",
                   "internal_call_required")
        if path in self.internal_paths:
            if signed and self.secret is not None:
                return bad_mac
            if self.secret is None:
                return ("this route is off: the server was started without a deployment "
                        "secret ($PDSERVE_DEPLOYMENT_SECRET or --secret-file)",
                        "internal_call_required")
            return ("this route serves only calls signed with the deployment secret",
                    "internal_call_required")
        if self.api_key is None or (path == "/metrics" and self.open_metrics):
            return None
        if bearer_matches(authorization, self.api_key):
            return None
        if authorization:
            return "Incorrect API key provided.", "invalid_api_key"
        if signed:
            return bad_mac
        return ("You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_api_key")


class AuthMiddleware:
    """Pure ASGI: reads a body only to check a MAC, so plain client requests stream through."""

    def __init__(self, app: ASGIApp, auth: HTTPAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        internal = False
        mac = headers.get(_AUTH_HEADER)
        if mac is not None and self.auth.verifier is not None:
            body = await _read_body(receive, MAX_SIGNED_BODY_BYTES)
            if body is None:
                await _refuse(send, 413, "the signed request body is too large",
                              "request_too_large")
                return
            internal = self.auth.verifier.verify(mac, scope["method"], scope["path"], body)
            receive = _replay(body, receive)
        # a fresh dict per request: the app's own state (uvicorn copies it) stays untouched
        scope["state"] = {**scope.get("state", {}), "internal": internal}
        why = self.auth.refusal(scope["path"], internal, headers.get(b"authorization"),
                                signed=mac is not None)
        if why is not None:
            await _refuse(send, 401, *why)
            return
        await self.app(scope, receive, send)


def _headers(scope: Scope) -> dict[bytes, str]:
    """The first value of each header, decoded as HTTP does (latin-1, never fails)."""
    out: dict[bytes, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.lower(), value.decode("latin-1"))
    return out


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None past `limit` bytes (or if the client left meanwhile)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None if message["type"] != "http.disconnect" else b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then the connection's own."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    """An OpenAI error body: clients' SDKs show its message."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
