"""Routing one request: P then D (disaggregated), or one instance whole (colocated, fallback).

Nothing reaches the client until an instance has answered, so a failed prefill is retried
elsewhere unseen. Once tokens flow, an instance that fails is replaced: the router knows the
token ids it relayed (the instance sends them with each chunk, and the router strips them),
and another instance resumes the answer after them, so the client sees a delay, not an
error (greedy text stays exactly the uninterrupted one). A non-streamed request whose
instance failed runs again whole elsewhere. Only when no instance is left, or after
MAX_RESUMES, does a stream end with an OpenAI error event.
Where a request runs is the routing policy's decision (policy.py), made from a view of the
request (its prompt's length and, for a cache-aware policy, how much of it each instance
holds, from the KV index) and of the healthy instances; this file carries it out.
P holds the prompt's KV under a lease until D pulls it; if D never gets the request (no D,
D failed, the client left first), the router asks P to free it rather than wait for the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.event_stream import EventStream
from pdserve.router.encode import Encoders
from pdserve.router.kv_index import KVIndex
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pairing import (
    Charge,
    charged,
    estimate_prompt_tokens,
    max_tokens_field,
    requested_max_tokens,
)
from pdserve.router.policy import (
    ANY_ROLE,
    Decision,
    InstanceView,
    Policy,
    RequestView,
    Stage,
    make_policy,
)
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.registry import Instance, Registry
from pdserve.router.relay import (
    InstanceFailed,
    Progress,
    StreamRelay,
    error_from,
    not_resumed,
    stream_failed,
)
from pdserve.router.shaping import (
    answer_as_stream,
    calls_tools,
    decode_body,
    error_body,
    first_chunks,
    first_text,
    include_usage,
    is_chat,
    prefill_body,
    resume_body,
    sse,
    strip_kv_params,
    tracked_body,
    without_kv_params,
)
from pdserve.router.upstream import Answer, Refused, Stream, StreamBroken, Upstream, UpstreamError

log = logging.getLogger(__name__)

# who may serve a whole request of each route if its chosen instance fails
PLAIN_ROLES = {"colocated": ("colocated",), "fallback": ANY_ROLE, "prefill_only": ("prefill",),
               "short_prompt": ANY_ROLE, "whole_on_decode": ANY_ROLE, "no_handoff": ANY_ROLE,
               "whole_only": ANY_ROLE}
RESUME_ROLES = ANY_ROLE  # who may take over a failed answer
MAX_RESUMES = 2  # per request: an answer that keeps killing instances is not chased forever
# request fields only the router may send an instance
INTERNAL_FIELDS = ("resume", "encoder_handles")


class NoInstance(Exception):
    """No healthy instance of the roles asked for is left."""


@dataclass
class Load:
    """The outstanding tokens one request puts on the instances it uses, and what the
    policy knows of it."""

    prompt: int
    max_tokens: int
    view: RequestView
    ids: list[int] | None = None  # the prompt's token ids, where the router tokenized it

    @classmethod
    def of(cls, body: dict, chat: bool, ids: list[int] | None = None,
           cached: dict[str, int] | None = None) -> Load:
        """From the body: the prompt's token ids where known (else an estimate), and the
        leading tokens of it each instance holds."""
        prompt = len(ids) if ids is not None else estimate_prompt_tokens(body)
        view = RequestView(prompt, _needs_decode(body, chat), _whole_only(body), cached or {})
        return cls(prompt, requested_max_tokens(body, chat) * num_choices(body), view, ids)

    def uncached_on(self, inst: Instance) -> int:
        return self.view.uncached_on(inst.url)


@dataclass
class Attempt:
    """One instance's open stream of an answer, and the load it is charged for."""

    inst: Instance
    resp: Stream
    charge: Charge


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


def num_choices(body: dict) -> int:
    """Choices of the answer: n for each prompt of a batch (the body is validated)."""
    n = body.get("n")
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    return (n if type(n) is int and n > 0 else 1) * (len(prompt) if batch else 1)


def _whole_only(body: dict) -> bool:
    """Served whole on one instance: several choices (the instance prefills their prompt
    once and decodes each), or echo (P's first chunk would carry the prompt)."""
    return num_choices(body) > 1 or body.get("echo") is True


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
    policy: Policy = field(default_factory=lambda: make_policy("least_loaded"))
    index: KVIndex = field(default_factory=KVIndex)  # the instances' prefix caches
    tokens: PromptTokenizer = field(default_factory=PromptTokenizer)
    encoders: Encoders = field(init=False)
    # lease releases in flight: the loop keeps only weak references to tasks
    _releases: set[asyncio.Task] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.encoders = Encoders(self.registry, self.upstream, self.metrics)

    async def route(self, path: str, body: dict) -> Response:
        """Answer one completion or chat request; 4xx from an instance pass through."""
        start, chat = time.monotonic(), is_chat(path)
        internal = [name for name in INTERNAL_FIELDS if name in body]
        if internal:
            return json_error(400, f"{internal[0]} is an internal field: clients may not "
                              "send it", None, "invalid_request_error")
        load = await self._load(body, chat)
        if chat:  # E: the images' rows made on encoder instances, P pulls them
            body = await self.encoders.attach(body)
        try:
            decision = self.decide(load)
            if decision.disaggregated:
                return await self.disagg(path, body, load, start, decision)
            if decision.kind == "fallback":
                self.metrics.fallbacks.inc()
            return await self.plain(path, body, load, decision.kind, start, decision.whole)
        except Refused as exc:
            return Response(exc.content, exc.status_code, media_type="application/json")
        except NoInstance as exc:
            return json_error(503, str(exc), "no_healthy_instance")
        except UpstreamError as exc:
            return json_error(502, str(exc), "upstream_failed")

    # ---- the policy's view and decision ------------------------------------------------

    async def _load(self, body: dict, chat: bool) -> Load:
        """The request's load and view: exact token counts (and cached prefixes) where the
        policy uses the cache and the prompt can be tokenized here, else an estimate."""
        ids = await self.tokens.ids(chat, body) if self.policy.uses_cache else None
        return Load.of(body, chat, ids, self.index.cached_tokens(ids) if ids else None)

    def decide(self, load: Load) -> Decision:
        """The policy's decision over the healthy instances, counted with its reason."""
        views = [self._view(i) for i in self.registry.engines() if i.healthy]
        decision = self.policy.decide(load.view, views)
        if decision is None:
            raise NoInstance("no healthy instance can serve the request")
        if load.ids:  # the prompt's blocks will be there: the next prompts that share them see it
            for url in {decision.whole, decision.prefill, decision.decode} - {None}:
                self.index.routed(url, load.ids)
        self.metrics.decisions.labels(self.policy.name, decision.kind, decision.reason).inc()
        return decision

    def _view(self, inst: Instance) -> InstanceView:
        return inst.view(self.index.num_blocks(inst.url))  # the index knows its cache's size

    def _pick(self, roles: tuple[str, ...], tried: set[str], load: Load, stage: Stage,
              prefer: str | None = None) -> Instance:
        """The decision's instance `prefer` on the first try; the policy's next best after."""
        if prefer is not None and prefer not in tried:
            inst = self.registry.instances.get(prefer)
            if inst is not None and inst.healthy:
                return inst
        for role in roles:
            candidates = [self._view(i) for i in self.registry.healthy(role)
                          if i.url not in tried]
            best = self.policy.pick(load.view, candidates, stage)
            if best is not None:
                return self.registry.instances[best.url]
        raise NoInstance(f"no healthy {' or '.join(roles)} instance can serve the request")

    # ---- one instance serves the whole request -----------------------------------------

    async def plain(self, path: str, body: dict, load: Load, kind: str, start: float,
                    prefer: str | None = None) -> Response:
        """Send the request unchanged to `prefer` (else the policy's pick); an instance that
        fails before answering is skipped."""
        label = "disagg" if kind == "prefill_only" else kind
        self.metrics.requests.labels(label).inc()
        if body.get("stream"):
            return await self._plain_stream(path, body, load, kind, label, start, prefer)
        resp = await self._whole(PLAIN_ROLES[kind], path, body, load, set(), prefer)
        self.metrics.e2e.labels(label).observe(time.monotonic() - start)
        return Response(strip_kv_params(resp.content), resp.status_code,
                        media_type="application/json")

    async def _whole(self, roles: tuple[str, ...], path: str, body: dict, load: Load,
                     tried: set[str], prefer: str | None = None) -> Answer:
        """A non-streamed answer from the first instance of `roles` that gives one; one
        that fails while answering is replaced, and the request runs again whole there."""
        while True:
            inst = self._pick(roles, tried, load, "whole", prefer)
            try:
                with charged(inst, load.prompt + load.max_tokens, load.uncached_on(inst)):
                    return await self.upstream.post(inst, path, body)
            except UpstreamError as exc:
                tried.add(inst.url)
                if not exc.connect:  # it had the request: what it did is lost
                    self.metrics.resumes.labels("rerun").inc()

    async def _plain_stream(self, path: str, body: dict, load: Load, kind: str, label: str,
                            start: float, prefer: str | None) -> Response:
        """The first instance that opens the stream; the relay resumes it if it fails."""
        tried: set[str] = set()
        while True:
            inst = self._pick(PLAIN_ROLES[kind], tried, load, "whole", prefer)
            charge = Charge(inst, load.prompt + load.max_tokens, load.uncached_on(inst))
            try:
                resp = await self.upstream.open_stream(inst, path, tracked_body(body))
            except BaseException as exc:
                charge.release()
                if not isinstance(exc, UpstreamError):
                    raise
                tried.add(inst.url)
                continue
            choices = num_choices(body)  # several, or an echo, are not resumed
            progress = Progress(tracked=choices == 1 and body.get("echo") is not True,
                                num_choices=choices)
            events = self._relay(path, body, Attempt(inst, resp, charge), progress, load,
                                 label, start)
            return StreamingResponse(events, media_type="text/event-stream")

    # ---- relaying a stream, and resuming it on another instance ------------------------

    async def _relay(self, path: str, body: dict, attempt: Attempt | None,
                     progress: Progress, load: Load, label: str, start: float,
                     failed: Sequence[str] = ()) -> AsyncIterator[str]:
        """Relay the stream of `attempt` (None: no instance took it, for the reason in
        `failed`); when its instance fails, resume the answer on another one after what the
        client has, up to MAX_RESUMES times. It ends with [DONE], or an error and [DONE]."""
        chat, tried, resumes = is_chat(path), set(), 0
        keep_ids = body.get("return_token_ids") is True
        timed = progress.response_id is not None  # disagg: TTFT was P's first chunk
        try:
            while True:
                if attempt is not None:
                    relay = StreamRelay(chat, progress, keep_ids)
                    try:
                        async for line in attempt.resp.lines():
                            event = relay.event(line)
                            if event is None:
                                continue
                            if not timed:
                                self.metrics.ttft.labels(label).observe(
                                    time.monotonic() - start)
                                timed = True
                            attempt.charge.first_token()
                            yield event
                        if progress.done:
                            return
                        raise StreamBroken("the stream ended before [DONE]")
                    except (StreamBroken, InstanceFailed) as exc:
                        self.upstream.broken(attempt.inst, exc)
                        tried.add(attempt.inst.url)
                        failed = stream_failed(attempt.inst, exc)
                    finally:
                        await attempt.resp.aclose()
                        attempt.charge.release()
                if progress.finished:  # all of it went out: only usage can be missing
                    yield sse("[DONE]")
                    return
                if resumes == MAX_RESUMES or not progress.tracked:
                    self.metrics.resumes.labels("limit" if progress.tracked
                                                else "untracked").inc()
                    for event in failed:
                        yield event
                    return
                resumes += 1
                try:
                    attempt = await self._open_resume(path, body, progress, load, tried)
                except (NoInstance, Refused) as exc:
                    outcome = "refused" if isinstance(exc, Refused) else "no_instance"
                    self.metrics.resumes.labels(outcome).inc()
                    log.warning("could not resume %s: %s", progress.response_id, exc)
                    for event in failed or not_resumed("no instance could take it over"):
                        yield event
                    return
                self.metrics.resumes.labels("resumed").inc()
        finally:
            self.metrics.e2e.labels(label).observe(time.monotonic() - start)

    async def _open_resume(self, path: str, body: dict, progress: Progress, load: Load,
                           tried: set[str]) -> Attempt:
        """Another instance's stream that continues the answer after what the client has;
        the first that can be reached (decode first, then colocated, then prefill)."""
        r_body = resume_body(body, progress.token_ids, progress.text_chars)
        while True:
            inst = self._pick(RESUME_ROLES, tried, load, "whole")
            charge = Charge(inst, load.prompt + load.max_tokens, load.uncached_on(inst))
            try:
                resp = await self.upstream.open_stream(inst, path, r_body)
                return Attempt(inst, resp, charge)
            except BaseException as exc:
                charge.release()
                if not isinstance(exc, UpstreamError):
                    raise
                tried.add(inst.url)

    # ---- P then D ----------------------------------------------------------------------

    async def disagg(self, path: str, body: dict, load: Load, start: float,
                     decision: Decision) -> Response:
        """Prefill on P (retrying other Ps), then decode on D; P alone if it finished. D is
        asked of the policy again once P has answered: the loads moved during the prefill
        (the decision's D was the best at arrival)."""
        chat = is_chat(path)
        prefilled = await self._prefill(path, body, load, decision.prefill)
        if prefilled is None:  # every prefill instance failed
            self.metrics.fallbacks.inc()
            return await self.plain(path, body, load, "fallback", start)
        p_inst, answer = prefilled
        if answer["choices"][0].get("finish_reason") != "length":  # EOS or stop: all done
            self.metrics.requests.labels("disagg").inc()
            return self._answer(without_kv_params(answer), body, chat, start)
        ktp = answer.get("kv_transfer_params")
        if not isinstance(ktp, dict) or not ktp.get("do_remote_prefill"):
            # P kept no KV (e.g. vLLM without a KV connector): D serves it whole, uncut
            self.metrics.handoffs_missing.inc()
            return await self.plain(path, body, load, "no_handoff", start)
        self.metrics.requests.labels("disagg").inc()
        held = HeldKV(p_inst, ktp.get("remote_request_id"), ktp.get("lease_token"))
        if body.get("stream"):
            # pdserve's P names its first token, which a pdserve D continues from: the
            # client gets it now (TTFT) and D, told so by `resume`, sends the rest; a D
            # that recomputes the first token itself (vLLM's) streams the whole answer
            sent = answer if type(ktp.get("first_token_id")) is int \
                and not calls_tools(body) else None  # a call is sent whole, by D
            d_body = tracked_body(decode_body(body, ktp))
            if sent is not None:
                d_body["resume"] = {"token_ids": [ktp["first_token_id"]],
                                    "text_chars": len(first_text(answer, chat))}
            events = self._disagg_stream(path, body, d_body, sent, held, load, start)
            # however it ends before D's stream is open (mostly: the client left), P's KV
            # goes back; a no-op once D has the request, or it was released
            return EventStream(events, lambda: self._release(held, "client_disconnect"))
        try:  # D's answer is the whole completion, P's first token included
            d_answer = await self._decode(path, decode_body(body, ktp), load)
        except (NoInstance, UpstreamError) as exc:  # D failed: the request runs whole again
            self._release(held, release_reason(exc))
            if isinstance(exc, UpstreamError) and not exc.connect:
                self.metrics.resumes.labels("rerun").inc()
            tried = {exc.inst.url} if isinstance(exc, UpstreamError) else set()
            resp = await self._whole(RESUME_ROLES, path, body, load, tried)
            self.metrics.e2e.labels("disagg").observe(time.monotonic() - start)
            return Response(strip_kv_params(resp.content), resp.status_code,
                            media_type="application/json")
        except BaseException as exc:  # D has stopped too (a cancelled post closes its socket)
            self._release(held, release_reason(exc))
            raise
        self.metrics.e2e.labels("disagg").observe(time.monotonic() - start)
        return JSONResponse(without_kv_params(d_answer))

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

    async def _prefill(self, path: str, body: dict, load: Load, prefer: str | None
                       ) -> tuple[Instance, dict] | None:
        """The prefill instance that answered, and its answer (None: every one failed)."""
        p_body, tried = prefill_body(body, is_chat(path)), set()
        while True:
            try:
                inst = self._pick(("prefill",), tried, load, "prefill", prefer)
            except NoInstance:
                return None
            t0 = time.monotonic()
            try:
                with charged(inst, load.prompt + 1, load.uncached_on(inst)) as charge:
                    resp = await self.upstream.post(inst, path, p_body)
                    charge.first_token()
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
            inst = self._pick(("decode",), tried, load, "decode")
            try:
                with charged(inst, load.prompt + load.max_tokens):
                    return (await self.upstream.post(inst, path, d_body)).json()
            except UpstreamError as exc:
                if not exc.connect:
                    raise
                tried.add(inst.url)

    async def _open_decode(self, path: str, d_body: dict, load: Load) -> Attempt:
        """D's open stream, charged; a D that cannot be reached is replaced."""
        tried: set[str] = set()
        while True:
            inst = self._pick(("decode",), tried, load, "decode")
            charge = Charge(inst, load.prompt + load.max_tokens, handoff=True)
            try:
                return Attempt(inst, await self.upstream.open_stream(inst, path, d_body),
                               charge)
            except BaseException as exc:
                charge.release()
                if not (isinstance(exc, UpstreamError) and exc.connect):
                    raise
                tried.add(inst.url)

    async def _disagg_stream(self, path: str, body: dict, d_body: dict, sent: dict | None,
                             held: HeldKV, load: Load, start: float) -> AsyncIterator[str]:
        """P's answer `sent` at once (if given), then D's chunks (its role chunk dropped, ids
        made P's). Until D's stream is open, P's KV is the router's to release (see
        `disagg`). If no D can take it, or D fails later, another instance resumes the
        answer after what the client has."""
        chat, usage = is_chat(path), include_usage(body)
        progress = Progress()
        if sent is not None:
            for chunk in first_chunks(sent, chat, usage):
                yield sse(chunk)
            self.metrics.ttft.labels("disagg").observe(time.monotonic() - start)
            progress = Progress.after_prefill(sent, chat,
                                              sent["kv_transfer_params"]["first_token_id"])
        attempt: Attempt | None = None
        failed: list[str] = []
        try:
            attempt = await self._open_decode(path, d_body, load)
        except Refused as exc:
            self._release(held, release_reason(exc))
            yield sse(error_from(exc.content))
            yield sse("[DONE]")
            return
        except Exception as exc:  # no D, or D failed before it accepted the request
            self._release(held, release_reason(exc))
            if not isinstance(exc, (UpstreamError, NoInstance)):
                raise
            failed = [sse(error_body(f"decode failed: {exc}", code="decode_failed")),
                      sse("[DONE]")]
        else:
            held.settled = True  # D accepted it: D pulls the KV and releases the lease
        async for event in self._relay(path, body, attempt, progress, load, "disagg", start,
                                       failed):
            yield event
