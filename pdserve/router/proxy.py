"""Routing one request: P then D (disaggregated), or one instance whole (colocated, fallback).

Nothing reaches the client until an instance has answered, so a failed prefill is retried
elsewhere unseen; once tokens flow, a failure ends the stream with an OpenAI error event.
A prompt shorter than `pd_min_prompt_tokens` skips P: it is served whole on a decode
instance (conditional disaggregation), since a short prefill gains less than the hop costs.
P holds the prompt's KV under a lease until D pulls it; if D never gets the request (no D,
D failed, the client left first), the router asks P to free it rather than wait for the TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.event_stream import EventStream
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pairing import (
    Charge,
    charged,
    estimate_prompt_tokens,
    least_loaded,
    max_tokens_field,
    requested_max_tokens,
)
from pdserve.router.registry import Instance, Registry
from pdserve.router.relay import DecodeRelay, error_from, stream_failed
from pdserve.router.shaping import (
    answer_as_stream,
    decode_body,
    error_body,
    first_chunks,
    first_text,
    include_usage,
    is_chat,
    merge,
    prefill_body,
    sse,
    strip_kv_params,
    strip_kv_params_line,
    without_kv_params,
)
from pdserve.router.upstream import Refused, Upstream, UpstreamError

PLAIN_ROLES = {"colocated": ("colocated",), "fallback": ("decode", "colocated", "prefill"),
               "prefill_only": ("prefill",), "short_prompt": ("decode", "colocated", "prefill")}


class NoInstance(Exception):
    """No healthy instance of the roles asked for is left."""


@dataclass
class Load:
    """The outstanding tokens one request puts on the instances it uses."""

    prompt: int
    max_tokens: int

    @classmethod
    def of(cls, body: dict, chat: bool) -> Load:
        return cls(estimate_prompt_tokens(body), requested_max_tokens(body, chat))


@dataclass
class HeldKV:
    """The prompt's KV that prefill instance `inst` holds under a lease until D pulls it."""

    inst: Instance
    request_id: str | None  # P's remote_request_id (None: a prefill we cannot release)
    lease_token: str | None = None  # the lease's capability: P releases nothing without it
    settled: bool = False  # D has the request (it releases), or the router released it


def _needs_decode(body: dict, chat: bool) -> bool:
    """False for max_tokens 1, and for a max_tokens P would not see to refuse (0, "9")."""
    value = max_tokens_field(body, chat)
    return value is None or (type(value) is int and value > 1)


def release_reason(exc: BaseException) -> str:
    """Why D never got the request, as the kv_releases metric labels it."""
    if isinstance(exc, NoInstance):
        return "no_decode"
    if isinstance(exc, Refused):  # D's engine frees a refused prefill, its HTTP layer not
        return "decode_refused"
    if isinstance(exc, Exception):
        return "decode_failed"
    return "client_disconnect"  # cancelled: the client left (or the router is stopping)


def json_error(status: int, message: str, code: str, type: str = "server_error") -> Response:
    return JSONResponse(error_body(message, type, code), status_code=status)


@dataclass
class Router:
    """Picks instances for each request and relays their answers to the client."""

    registry: Registry
    upstream: Upstream
    metrics: RouterMetrics
    pd_min_prompt_tokens: int = 0  # shorter prompts skip P (0: always disaggregate)
    # lease releases in flight: the loop keeps only weak references to tasks
    _releases: set[asyncio.Task] = field(default_factory=set, repr=False)

    async def route(self, path: str, body: dict) -> Response:
        """Answer one completion or chat request; 4xx from an instance pass through."""
        start, chat = time.monotonic(), is_chat(path)
        load = Load.of(body, chat)
        try:
            if self.registry.healthy("prefill") and self.registry.healthy("decode"):
                if not _needs_decode(body, chat):  # one token (or bad): P alone
                    return await self.plain(path, body, load, "prefill_only", start)
                if load.prompt < self.pd_min_prompt_tokens:
                    return await self.plain(path, body, load, "short_prompt", start)
                return await self.disagg(path, body, load, start)
            if self.registry.healthy("colocated"):
                return await self.plain(path, body, load, "colocated", start)
            self.metrics.fallbacks.inc()
            return await self.plain(path, body, load, "fallback", start)
        except Refused as exc:
            return Response(exc.content, exc.status_code, media_type="application/json")
        except NoInstance as exc:
            return json_error(503, str(exc), "no_healthy_instance")
        except UpstreamError as exc:
            return json_error(502, str(exc), "upstream_failed")

    # ---- one instance serves the whole request -----------------------------------------

    def _pick(self, roles: tuple[str, ...], tried: set[str]) -> Instance:
        for role in roles:
            inst = least_loaded(self.registry.healthy(role), tried)
            if inst is not None:
                return inst
        raise NoInstance(f"no healthy {' or '.join(roles)} instance can serve the request")

    async def plain(self, path: str, body: dict, load: Load, kind: str, start: float
                    ) -> Response:
        """Send the request unchanged; an instance that fails before answering is skipped."""
        label = "disagg" if kind == "prefill_only" else kind
        self.metrics.requests.labels(label).inc()
        tried: set[str] = set()
        while True:
            inst = self._pick(PLAIN_ROLES[kind], tried)
            try:
                if body.get("stream"):
                    return await self._plain_stream(inst, path, body, load, label, start)
                with charged(inst, load.prompt + load.max_tokens):
                    resp = await self.upstream.post(inst, path, body)
                self.metrics.e2e.labels(label).observe(time.monotonic() - start)
                return Response(strip_kv_params(resp.content), resp.status_code,
                                media_type="application/json")
            except UpstreamError:
                tried.add(inst.url)

    async def _plain_stream(self, inst: Instance, path: str, body: dict, load: Load,
                            label: str, start: float) -> Response:
        charge = Charge(inst, load.prompt + load.max_tokens)
        try:
            resp = await self.upstream.open_stream(inst, path, body)
        except BaseException:
            charge.release()
            raise
        return StreamingResponse(self._relay(inst, resp, charge, label, start),
                                 media_type="text/event-stream")

    async def _relay(self, inst: Instance, resp: httpx.Response, charge: Charge, label: str,
                     start: float) -> AsyncIterator[str]:
        """Pass SSE lines through; a broken stream ends with an error event."""
        done, first = False, True
        try:
            async for line in resp.aiter_lines():
                if first and line.startswith("data: "):
                    self.metrics.ttft.labels(label).observe(time.monotonic() - start)
                    first = False
                done = done or line == "data: [DONE]"
                yield strip_kv_params_line(line) + "\n"
            if not done:
                raise httpx.RemoteProtocolError("the stream ended before [DONE]")
        except httpx.TransportError as exc:
            self.upstream.broken(inst, exc)
            for event in stream_failed(inst, exc):
                yield event
        finally:
            await resp.aclose()
            charge.release()
            self.metrics.e2e.labels(label).observe(time.monotonic() - start)

    # ---- P then D ----------------------------------------------------------------------

    async def disagg(self, path: str, body: dict, load: Load, start: float) -> Response:
        """Prefill on P (retrying other Ps), then decode on D; P alone if it finished."""
        chat = is_chat(path)
        prefilled = await self._prefill(path, body, load)
        if prefilled is None:  # every prefill instance failed
            self.metrics.fallbacks.inc()
            return await self.plain(path, body, load, "fallback", start)
        p_inst, answer = prefilled
        self.metrics.requests.labels("disagg").inc()
        ktp = answer.get("kv_transfer_params")
        if not ktp or answer["choices"][0].get("finish_reason") != "length":
            return self._answer(without_kv_params(answer), body, chat, start)  # EOS/stop
        held = HeldKV(p_inst, ktp.get("remote_request_id"), ktp.get("lease_token"))
        d_body = decode_body(body, ktp)
        if body.get("stream"):
            events = self._disagg_stream(path, body, d_body, answer, held, load, start)
            # however it ends before D's stream is open (mostly: the client left), P's KV
            # goes back; a no-op once D has the request, or it was released
            return EventStream(events, lambda: self._release(held, "client_disconnect"))
        try:
            d_answer = await self._decode(path, d_body, load)
        except BaseException as exc:  # D has stopped too (a cancelled post closes its socket)
            self._release(held, release_reason(exc))
            raise
        self.metrics.e2e.labels("disagg").observe(time.monotonic() - start)
        return JSONResponse(merge(answer, d_answer, chat))

    def _release(self, held: HeldKV, reason: str) -> None:
        """D will never pull `held`: ask P to free it now rather than at the lease's expiry.
        Best effort, in a task of its own so that it outlives the cancelled request."""
        if held.settled or not isinstance(held.request_id, str):
            return
        held.settled = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream finalized after the loop stopped: the TTL frees it
            return
        self.metrics.kv_releases.labels(reason).inc()
        task = loop.create_task(self.upstream.release_lease(held.inst, held.request_id,
                                                            held.lease_token))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _prefill(self, path: str, body: dict, load: Load
                       ) -> tuple[Instance, dict] | None:
        """The prefill instance that answered, and its answer (None: every one failed)."""
        p_body, tried = prefill_body(body, is_chat(path)), set()
        while True:
            inst = least_loaded(self.registry.healthy("prefill"), tried)
            if inst is None:
                return None
            t0 = time.monotonic()
            try:
                with charged(inst, load.prompt + 1):
                    resp = await self.upstream.post(inst, path, p_body)
            except UpstreamError:
                tried.add(inst.url)
                self.metrics.prefill_retries.inc()
                continue
            self.metrics.prefill_latency.observe(time.monotonic() - t0)
            return inst, resp.json()

    def _answer(self, answer: dict, body: dict, chat: bool, start: float) -> Response:
        """P's own whole answer, as JSON or replayed as a stream."""
        self.metrics.e2e.labels("disagg").observe(time.monotonic() - start)
        if not body.get("stream"):
            return JSONResponse(answer)
        events = answer_as_stream(answer, chat, include_usage(body))
        return StreamingResponse(iter(events), media_type="text/event-stream")

    async def _decode(self, path: str, d_body: dict, load: Load) -> dict:
        """D's whole answer; a D that cannot be reached is replaced (P still holds the KV)."""
        tried: set[str] = set()
        while True:
            inst = self._pick(("decode",), tried)
            try:
                with charged(inst, load.prompt + load.max_tokens):
                    return (await self.upstream.post(inst, path, d_body)).json()
            except UpstreamError as exc:
                if not exc.connect:
                    raise
                tried.add(inst.url)

    async def _open_decode(self, path: str, d_body: dict, tokens: int
                           ) -> tuple[Instance, httpx.Response, Charge]:
        """D's open stream, charged; a D that cannot be reached is replaced."""
        tried: set[str] = set()
        while True:
            inst = self._pick(("decode",), tried)
            charge = Charge(inst, tokens)
            try:
                return inst, await self.upstream.open_stream(inst, path, d_body), charge
            except BaseException as exc:
                charge.release()
                if not (isinstance(exc, UpstreamError) and exc.connect):
                    raise
                tried.add(inst.url)

    async def _disagg_stream(self, path: str, body: dict, d_body: dict, answer: dict,
                             held: HeldKV, load: Load, start: float) -> AsyncIterator[str]:
        """P's token at once, then D's chunks (its role chunk dropped, ids made P's). Until
        D's stream is open, P's KV is the router's to release (see `disagg`)."""
        chat, usage = is_chat(path), include_usage(body)
        for chunk in first_chunks(answer, chat, usage):
            yield sse(chunk)
        self.metrics.ttft.labels("disagg").observe(time.monotonic() - start)
        try:
            inst, resp, charge = await self._open_decode(path, d_body,
                                                         load.prompt + load.max_tokens)
        except Refused as exc:
            self._release(held, release_reason(exc))
            yield sse(error_from(exc.content))
            yield sse("[DONE]")
            return
        except Exception as exc:  # no D, or D failed before it accepted the request
            self._release(held, release_reason(exc))
            if not isinstance(exc, (UpstreamError, NoInstance)):
                raise
            yield sse(error_body(f"decode failed: {exc}", code="decode_failed"))
            yield sse("[DONE]")
            return
        held.settled = True  # D accepted it: D pulls the KV and releases the lease
        relay = DecodeRelay(answer["id"], chat, len(first_text(answer, chat)))
        try:
            async for line in resp.aiter_lines():
                event = relay.event(line)
                if event is not None:
                    yield event
            if not relay.done:
                raise httpx.RemoteProtocolError("the stream ended before [DONE]")
        except httpx.TransportError as exc:
            self.upstream.broken(inst, exc)
            for event in stream_failed(inst, exc):
                yield event
        finally:
            await resp.aclose()
            charge.release()
            self.metrics.e2e.labels("disagg").observe(time.monotonic() - start)
