"""One request's generation: engine token deltas in, safe text deltas out, metrics on the way.

Stop strings end the request here (the engine only knows token ids), so on a stop string
the engine request is aborted and its blocks freed at once; a prefill the engine already
finished and holds for a decode instance has its lease released instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.engine.handoff import RemotePrefill
from pdserve.engine.outputs import EngineRequest, RequestOutput, RequestTimes, TokenLogprob
from pdserve.server.detokenizer import IncrementalDetokenizer
from pdserve.server.engine_client import ABORTED, EngineClient, EngineDeadError
from pdserve.server.errors import bad_request, engine_dead
from pdserve.server.handoff import sign_prefill
from pdserve.server.metrics import FinishedRequest, ServerMetrics


@dataclass
class Delta:
    """What one engine step added to a request, as the client should see it."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class Generation:
    """Runs one engine request and keeps its totals for `usage`."""

    client: EngineClient
    metrics: ServerMetrics
    tokenizer: object
    request: EngineRequest
    stop: list[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    resume_text_chars: int = 0  # a resumed request: characters of its text the client has
    max_tokens_param: int | None = None  # the client's max_tokens, for /metrics
    n_param: int = 1  # the client's n, for /metrics (0: a sibling choice, not counted again)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    kv_transfer_params: dict | None = None
    times: RequestTimes | None = None  # the engine's phase times, from its finishing output
    _start: float = 0.0  # when start() began: the request's arrival, for TTFT and e2e
    _last: float = 0.0  # when the previous token arrived, for inter-token latency
    _queue: asyncio.Queue | None = None  # the engine client's queue of this request's outputs
    _aborted: bool = False  # the client left before the engine accepted the request

    def __post_init__(self) -> None:
        self.prompt_tokens = len(self.request.prompt_token_ids)
        # a resumed request counts the tokens generated before it moved here (the client
        # has them); a decode instance's first token, P's, is counted as it is sent
        self.completion_tokens = len(self.request.output_token_ids)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    async def start(self) -> None:
        """Submit to the engine and wait for its verdict; raises APIError if refused
        (400) or if the engine is dead (503). Call once, before `deltas`."""
        self._start = self._last = time.monotonic()
        try:
            self._queue = self.client.add(self.request)
            verdict = await self._queue.get()
        except EngineDeadError as exc:
            raise engine_dead() from exc
        except BaseException:  # cancelled while waiting: the engine must not run it
            self.cancel()
            raise
        if isinstance(verdict, EngineDeadError):
            raise engine_dead() from verdict
        if verdict is not ABORTED and verdict.error is not None:
            raise bad_request(verdict.error)
        self._aborted = verdict is ABORTED
        if not self._aborted:  # its verdict came: the engine has unpickled the request, so
            # the pixels are the engine's; ours would keep 40-50 MB an image to the end
            self.request.images = []

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yield deltas until the request finishes; leaving early aborts the engine request."""
        detok = IncrementalDetokenizer(
            self.tokenizer, self.request.prompt_token_ids, self.stop,
            self.include_stop_str_in_output, self.skip_special_tokens,
        )
        if self.request.output_token_ids:  # its text goes on where the client's text ends
            detok.resume(self.request.output_token_ids, self.resume_text_chars)
        reason = "abort"
        finished = self._aborted
        try:
            prefill = self._unsent_prefill(finished)
            if prefill is not None:  # D: the answer starts with P's token, as vLLM's D's does
                logprob = prefill.first_token_logprob
                yield self._consume(detok, [prefill.first_token_id], [logprob] if logprob else [])
            while not finished:
                out = await self._queue.get()
                if out is ABORTED:
                    return
                if isinstance(out, EngineDeadError):
                    raise out
                finished = out.finished
                self._absorb(out)
                delta = self._to_delta(detok, out)
                if finished:
                    self._release_unneeded_lease(delta)
                reason = delta.finish_reason or reason
                if delta.text or delta.token_ids or delta.finish_reason:
                    yield delta
                if delta.finish_reason is not None:
                    return
        except EngineDeadError as exc:
            reason = "error"
            raise engine_dead() from exc
        finally:
            if not finished:
                self.cancel()  # sync, so it also runs under cancellation
            if reason != "error":  # errors are counted by status in request_errors
                self.metrics.observe_finished(FinishedRequest(
                    reason, self.prompt_tokens, self.completion_tokens,
                    time.monotonic() - self._start, self.request.params.max_tokens,
                    self.max_tokens_param, self.times, self.cached_tokens, self.n_param))

    def _unsent_prefill(self, aborted: bool) -> RemotePrefill | None:
        """On D, P's hand-off whose first token the client lacks (unless the router streamed
        it and sent it back as `resume`): D's answer is then the whole completion, first
        token included, which is what vLLM's P/D proxies expect of a decode instance."""
        handoff = self.request.handoff
        if aborted or self.request.output_token_ids or not isinstance(handoff, RemotePrefill):
            return None
        return handoff

    def cancel(self) -> None:
        """The client went away: free the engine's blocks and end `deltas`."""
        self.client.abort(self.request.request_id)

    def _absorb(self, out: RequestOutput) -> None:
        """Latency metrics and the usage/kv_transfer_params totals of one engine output."""
        if out.new_token_ids:
            now = time.monotonic()
            if self._last == self._start:  # this instance's first token (after P's on D)
                self.metrics.observe_first_token(now - self._start)
            else:
                self.metrics.observe_inter_token(now - self._last)
            self._last = now
        self.prompt_tokens = out.num_prompt_tokens or self.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, out.num_cached_tokens)
        self.times = out.times or self.times
        if out.held is not None:  # P held the KV: sign the hand-off for D
            self.kv_transfer_params = sign_prefill(
                self.client.args.deployment_secret, out.held, self.request.prompt_token_ids,
                out.new_logprobs[0] if out.new_logprobs else None)

    def _release_unneeded_lease(self, delta: Delta) -> None:
        """The engine holds a prefill's KV for D only when it ran to max_tokens; a stop
        string that ended it here means no D will pull: free the blocks now, not at the TTL."""
        if self.kv_transfer_params is not None and delta.finish_reason != "length":
            self.client.release_lease(self.request.request_id,
                                      self.kv_transfer_params.get("lease_token"))
            self.kv_transfer_params = None  # nothing is held any more: no params, as vLLM

    def _to_delta(self, detok: IncrementalDetokenizer, out: RequestOutput) -> Delta:
        """The client's view of one output; a stop string finishes it early."""
        delta = self._consume(detok, out.new_token_ids, out.new_logprobs or [])
        if detok.stopped_by is not None:
            delta.finish_reason, delta.stop_reason = "stop", detok.stopped_by
        elif out.finished:
            delta.text += detok.flush()
            delta.finish_reason = out.finish_reason or "stop"
            if delta.finish_reason == "stop" and out.new_token_ids:
                delta.stop_reason = self._stop_token(out.new_token_ids[-1])
        return delta

    def _consume(self, detok: IncrementalDetokenizer, token_ids: list[int],
                 logprobs: list[TokenLogprob]) -> Delta:
        """Feed tokens one by one so that nothing after a stop string is counted or sent."""
        delta = Delta(text="", token_ids=[])
        for i, tid in enumerate(token_ids):
            delta.text += detok.add_token(tid)
            delta.token_ids.append(tid)
            if i < len(logprobs):
                delta.logprobs.append(logprobs[i])
            self.completion_tokens += 1
            if detok.stopped_by is not None:
                break
        return delta

    def _stop_token(self, token_id: int) -> int | None:
        """The stop_token_ids entry that ended the request (None for EOS)."""
        return token_id if token_id in self.request.params.stop_token_ids else None
