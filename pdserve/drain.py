"""Graceful drain on SIGTERM / Ctrl-C, shared by an instance and the router.

The first signal starts a drain: the server keeps listening, but new generation requests
get 503 with `Retry-After` and an OpenAI error body, /health answers 503 "draining" (so a
router stops sending), and requests in flight run to completion for up to `timeout_s`
seconds. Then any stream still open ends with an error event and `[DONE]` (a request not
yet answered gets the 503), and the server stops. A second signal ends the drain at once;
a third stops without waiting.

The drain lives in an ASGI middleware, so the serving code and the router's proxy need
not know about it: it counts the guarded requests, refuses them while draining, and at
the deadline cancels the ones left and finishes their responses itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from starlette.responses import JSONResponse

from pdserve.race import run_until

DEFAULT_DRAIN_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1  # a client (or proxy) should retry at once, on another instance
EXPIRED_GRACE_S = 5.0  # after the deadline: time for the cut streams to send their end
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

DRAINING_MESSAGE = "The server is shutting down; retry the request (on another instance)."


def add_drain_flag(p: argparse.ArgumentParser) -> None:
    """--drain-timeout, shared by serve, router and up."""
    p.add_argument("--drain-timeout", type=_non_negative_float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: refuse new requests (503, Retry-After) and let "
                   "those in flight finish for up to this long; then open streams end with an "
                   "error event and [DONE]. A second signal ends the drain at once")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def draining_body() -> dict:
    """The OpenAI error body of a request refused (or cut) because the server drains."""
    return {"error": {"message": DRAINING_MESSAGE, "type": "server_error", "param": None,
                      "code": "draining"}}


def draining_health() -> JSONResponse:
    """/health while draining: 503, so that routers and load balancers stop sending."""
    return JSONResponse({"status": "draining", **draining_body()}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class Drain:
    """The drain state of one server: whether it drains, and the requests still in flight."""

    timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    draining: bool = False
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _expired: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    async def run(self) -> None:
        """Refuse new work, wait for the requests in flight (up to `timeout_s`), then cut the
        rest; returns when none is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
            return
        except TimeoutError:
            pass
        self.expire()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), EXPIRED_GRACE_S)

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def expire(self) -> None:
        """End the drain now: open streams get their error event and [DONE]."""
        self.draining = True
        self._expired.set()

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


class DrainMiddleware:
    """ASGI middleware: counts generation requests, refuses them while draining, and ends
    the ones still running when the drain expires."""

    def __init__(self, app, drain: Drain, paths: frozenset[str] = GENERATION_PATHS) -> None:
        self.app = app
        self.drain = drain
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _send_refusal(send)
            return
        self.drain._enter()
        try:
            await self._serve(scope, receive, send)
        finally:
            self.drain._leave()

    async def _serve(self, scope, receive, send) -> None:
        response = _ResponseState()

        async def tracked_send(message: dict) -> None:
            response.observe(message)
            await send(message)

        work = await run_until(self.app(scope, receive, tracked_send), self.drain._expired.wait())
        if not work.done():  # the drain expired first: cut the request, end its response
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            await _finish_cut(send, response)
            return
        work.result()  # re-raise the app's own failure, as without the middleware


@dataclass
class _ResponseState:
    """What the client has been sent so far."""

    started: bool = False
    streaming: bool = False
    finished: bool = False

    def observe(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = dict(message.get("headers") or [])
            self.streaming = b"text/event-stream" in headers.get(b"content-type", b"")
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.finished = True


async def _send_refusal(send) -> None:
    body = json.dumps(draining_body()).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _finish_cut(send, response: _ResponseState) -> None:
    """End a response the drain cut: an error event and [DONE] for a stream, a 503 for a
    request not yet answered."""
    if response.finished:
        return
    if not response.started:
        await _send_refusal(send)
        return
    tail = b""
    if response.streaming:
        tail = f"data: {json.dumps(draining_body())}\n\ndata: [DONE]\n\n".encode()
    with contextlib.suppress(Exception):  # the client may have left meanwhile
        await send({"type": "http.response.body", "body": tail, "more_body": False})


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM / Ctrl-C drains first (see the module docstring).

    No signal is re-raised after the drain: the process exits with code 0, quietly.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self.signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if not self.started or self._loop is None or self.signals >= 3:
            self.should_exit = True  # before serving (nothing to drain), or insisted
            self.force_exit = self.signals >= 3
            return
        if self.signals == 2:
            self._loop.call_soon_threadsafe(self.drain.expire)
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signal_name: str) -> None:
        self.drain.draining = True  # at once: no request may slip in before the task runs
        started = time.monotonic()
        busy = self.drain.in_flight
        print(f"pdserve: {signal_name}, stopping" + (
            f" once {busy} request(s) in flight finish (up to {self.drain.timeout_s:g} s; "
            "again to stop sooner)" if busy else ""), file=sys.stderr, flush=True)

        async def drain_then_exit() -> None:
            await self.drain.run()
            if self.drain.expired:
                print(f"pdserve: drain ended after {time.monotonic() - started:.1f} s; "
                      "requests still running were cut", file=sys.stderr, flush=True)
            self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())
