"""Limits on what a client may send over HTTP, shared by the router and the instances.

A body is refused with 413 beyond `max_bytes` (checked on Content-Length and again while the
body arrives, chunked or not), and its JSON with 400 when it is not an object, nests deeper
than MAX_JSON_DEPTH, holds a number that is not finite (NaN, Infinity, 1e400) or a string
that is not valid Unicode (a lone surrogate such as "\\ud800"). Each of these once reached
a handler and ended as a 500 or a crash further in.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
MAX_JSON_DEPTH = 64  # an OpenAI request nests 5 deep; deep nesting only costs recursion
PARSE_IN_THREAD_BYTES = 256 * 2**10  # a larger body is parsed off the event loop
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # only an escape can make one


class BodyError(Exception):
    """A body refused before validation: 400 (malformed) or 413 (too large)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = "request_too_large" if status_code == 413 else None

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "param": None, "code": self.code}}


@dataclass
class MaxBody:
    """The body limit, in bytes; a server raises it once it knows its model takes images."""

    bytes: int = DEFAULT_MAX_REQUEST_BYTES


def too_large(max_bytes: int) -> BodyError:
    return BodyError(f"Request body is larger than the limit of {max_bytes} bytes", 413)


class BodyLimit:
    """ASGI middleware: a request whose Content-Length exceeds `max_bytes` is answered 413
    at once; a body that grows past it while arriving raises BodyError in its reader, which
    answers 413 too unless that reader (a route's parser) answers first. Install it
    outermost, so that it bounds every layer that reads a body (the auth middleware too)."""

    def __init__(self, app, max_bytes: int | MaxBody = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.limit = max_bytes if isinstance(max_bytes, MaxBody) else MaxBody(max_bytes)

    @property
    def max_bytes(self) -> int:
        return self.limit.bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            err = too_large(self.max_bytes) if length.isdigit() else BodyError(
                "Content-Length is not a number")
            await JSONResponse(err.body(), err.status_code)(scope, receive, send)
            return
        received, started = 0, False

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracked_send)
        except BodyError as err:  # nobody inside answered it
            if started:
                raise
            await JSONResponse(err.body(), err.status_code)(scope, receive, send)


def install(app: FastAPI, max_bytes: int | MaxBody = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Bound every request body of `app` (call after adding its other middleware)."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes)


async def read_json_body(request: Request) -> dict:
    """The request's body as a JSON object, within every limit above; raises BodyError.
    Large bodies are parsed in a worker thread, so the event loop keeps answering."""
    raw = await request.body()  # BodyLimit bounds it while it arrives
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(parse_json_object, raw)
    return parse_json_object(raw)


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """Strict JSON → dict; raises BodyError (400) with a readable message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"Request body is not valid UTF-8: {exc}") from exc
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except BodyError:
        raise
    except RecursionError as exc:
        raise BodyError(f"Request body nests deeper than {max_depth} levels") from exc
    except ValueError as exc:  # JSONDecodeError, and ints of more than 4300 digits
        raise BodyError(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BodyError("Request body must be a JSON object")
    check_text = _SURROGATE_ESCAPE.search(raw) is not None
    if check_text or raw.count(b"[") + raw.count(b"{") > max_depth:  # else nothing to walk
        _check_tree(data, max_depth, check_text)
    return data


def _refuse_constant(name: str) -> float:
    raise BodyError(f"Request body holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"Request body holds the number {text[:40]}, which is out of range")
    return value


def _check_tree(data: dict, max_depth: int, check_text: bool) -> None:
    """Depth within `max_depth`; with `check_text`, every string and key valid Unicode."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise BodyError(f"Request body nests deeper than {max_depth} levels")
        items = list(node.items()) if isinstance(node, dict) else node
        for item in items:
            if isinstance(item, tuple):  # a dict's (key, value)
                key, item = item
                if check_text:
                    _check_unicode(key)
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
            elif check_text and isinstance(item, str):
                _check_unicode(item)


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyError(f"Request body holds a string that is not valid Unicode: {exc}") from exc
