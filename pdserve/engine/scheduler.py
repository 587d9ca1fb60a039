"""Continuous batching with chunked prefill and recompute preemption.

Every step has a token budget. Running requests go first (a decode costs one token, an
unfinished prefill the rest of its prompt, chunked to the budget); then waiting requests
are admitted in arrival order while budget, sequence slots and blocks last. A prompt that
would fit a step whole is not split because prompts admitted ahead of it took part of this
one: it waits for the next step (a prompt longer than what the running requests leave is
chunked as before). When a running request cannot get a block, the most recently admitted
running request is preempted: its blocks are freed and it waits to be recomputed (its full
blocks usually survive in the prefix cache, so the recompute is cheap).

With `finish_first_tokens` (off by default), a response about to end is not held up by a
long prompt: while a decoding request is at most that many tokens short of its max_tokens,
prompts of more than FINISH_FIRST_PROMPT_TOKENS wait (for at most that many steps in a row,
so admission always moves). Its last tokens would otherwise each wait a whole prefill step.

With an ITL target (`max_step_ms`) and a step-time model, a step that runs decodes also has
a time budget: each prefill chunk is the largest that keeps the step's predicted time under
the target, so a long prompt arriving never stalls the requests already decoding. The
step's first prefill still gets at least one block, so no prefill starves. A step without
decodes has no one to stall: the token budget alone sizes it.

KV computed elsewhere (D's prefill, on P) is the KV connector's business: admitting a
request, the scheduler asks it how many prompt tokens come from elsewhere; with some, the
request gets its blocks and waits in `pulling` until the connector hands the pull back
(`finish_pull`). See engine/connector.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.connector import Connector, NullConnector
from pdserve.engine.histogram import ITERATION_TOKEN_BUCKETS, StepHistogram
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.step_time import StepShape, StepTimeModel

# a prompt this long takes many decode steps' time to prefill on any device (on a 2-core CPU
# 256 tokens took ~10 steps of 8 decodes, 1,024 ~40): worth finishing a response before it
FINISH_FIRST_PROMPT_TOKENS = 256


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to run through the model this step
    # this step computes the request's last known token, so it yields logits (set once here:
    # the runner and the engine both ask, and the answer changes once the step is applied)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        r = self.request
        self.samples = r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 connector: Connector | None = None, step_time: StepTimeModel | None = None):
        self.config = config
        self.kv = kv
        self.connector: Connector = connector or NullConnector()
        self.step_time = step_time  # predicts a step's seconds; used with config.max_step_ms
        self._shape: StepShape | None = None  # this step's shape while a time budget applies
        self._held_steps = 0  # steps in a row that held a long prompt back (_holds_admission)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pulling: dict[str, Request] = {}  # waiting for their KV from elsewhere
        self.aborted_pulls: dict[str, Request] = {}  # their blocks are freed when the pull ends
        self.num_preemptions = 0
        self.num_pulled_tokens = 0  # D side: prompt tokens whose KV came from P, all requests
        self.iteration_tokens = StepHistogram(ITERATION_TOKEN_BUCKETS)  # tokens per step

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request, free_blocks: bool = True) -> None:
        """Take a request out of whichever queue holds it (and free its blocks). One still
        pulling keeps its blocks until its pull ends: the pull is writing into them."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif self.pulling.pop(request.request_id, None) is not None:
            self.aborted_pulls[request.request_id] = request
            return
        if free_blocks:
            self.kv.free(request)

    def finish_pull(self, request_id: str, ok: bool) -> None:
        """The prompt's KV arrived (decode next) or did not (prefill it locally)."""
        aborted = self.aborted_pulls.pop(request_id, None)
        if aborted is not None:
            self.kv.free(aborted)
            return
        request = self.pulling.pop(request_id, None)
        if request is None:  # a pull of no blocks (all hit D's prefix cache): it went on
            return
        if ok:  # P's KV covers the prompt past this engine's own prefix-cache hit
            request.num_pulled_tokens = request.num_prompt_tokens - request.num_computed_tokens
            self.num_pulled_tokens += request.num_pulled_tokens
            request.num_computed_tokens = request.num_prompt_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self.kv.publish_full_blocks(request)
        else:
            self.kv.free(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._shape = self._decode_shape()
        self._schedule_running(out, budget)
        budget -= out.num_tokens
        if not out.preempted:  # no admissions while the pool is too tight to keep the running
            self._schedule_waiting(out, budget)
        if out.scheduled:
            self.iteration_tokens.observe(out.num_tokens)
        return out

    def _decode_shape(self) -> StepShape | None:
        """The running decodes' share of this step, when an ITL target applies to it: a target
        and a model are set, chunking is on and some request is decoding."""
        target, model = self.config.max_step_ms, self.step_time
        if not (target and model and self.config.enable_chunked_prefill):
            return None
        shape = StepShape()
        for r in self.running:
            if r.num_tokens - r.num_computed_tokens == 1:
                shape.add_decode(r.num_tokens)
        return shape if shape.decode_rows else None

    def _time_budget(self, request: Request, budget: int) -> int:
        """Prefill tokens of `request` that keep the step under the ITL target; the step's
        first prefill gets at least a block so that a prefill always moves."""
        shape = self._shape
        if shape is None:
            return budget
        fits = self.step_time.max_prefill_tokens(
            shape, request.num_computed_tokens, self.config.max_step_ms / 1e3, budget)
        if shape.prefill_tokens == 0:
            fits = max(fits, min(self.kv.block_size, budget))
        return fits

    def _add(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        if self._shape is not None and request.num_tokens - request.num_computed_tokens > 1:
            self._shape.add_prefill(num_new, request.num_computed_tokens)  # decodes: up front
        out.scheduled.append(ScheduledRequest(request, num_new))

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining > 1:  # a prefill: the time budget may cap it below the token budget
            budget = self._time_budget(request, budget)
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> None:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = 0 if self._ends_when_applied(request) else self._num_new_tokens(
                request, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                self._add(out, request, num_new)
                budget -= num_new
                i += 1

    @staticmethod
    def _ends_when_applied(request: Request) -> bool:
        """Its token in flight (async scheduling) is its last: nothing more to compute (on P
        this keeps a prefill that ends with its first token out of the next step)."""
        pending = request.num_pending_tokens
        return bool(pending) and len(request.output_token_ids) + pending >= \
            request.params.max_tokens

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _waits_for_leader(self, request: Request) -> bool:
        """A sibling choice waits while its leader computes their shared prompt, then hits
        the blocks the leader published (only the last partial block is computed again)."""
        leader = request.prefill_leader
        if leader is None:
            return False
        if (self.kv.pool.enable_prefix_caching and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens):
            return True
        request.prefill_leader = None  # published (or gone): admit it like any other
        return False

    def _next_waiting(self) -> Request | None:
        """The first waiting request that may be admitted now, in arrival order."""
        return next((r for r in self.waiting if not self._waits_for_leader(r)), None)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        room = budget  # what the running requests left: a prompt this size fits next step
        while self.waiting and budget > 0 and self._num_seqs() < self.config.max_num_seqs:
            request = self._next_waiting()
            if request is None:
                break
            hit = self.kv.take_prefix(request)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = hit
            remote = self.connector.matched_remote_tokens(request)
            if remote:
                if not self._admit_pull(request, hit, remote):
                    break
                continue
            num_new = self._num_new_tokens(request, budget)
            if self._waits_for_a_whole_step(request, num_new, room) or \
                    self._holds_admission(request):
                num_new = 0
            if num_new == 0 or not self.kv.allocate_slots(request, num_new):
                self.kv.free(request)  # give the prefix blocks back; retry next step
                request.num_computed_tokens = 0
                break
            self.kv.pool.record_lookup(request.num_tokens, hit)
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            request.scheduled_time = request.scheduled_time or time.monotonic()
            self.running.append(request)
            self.connector.blocks_allocated(request, request.block_ids, hit)
            self._add(out, request, num_new)
            budget -= num_new

    def _waits_for_a_whole_step(self, request: Request, num_new: int, room: int) -> bool:
        """A prompt that the prompts admitted ahead of it would split across two steps waits
        for the next, where it fits whole (the first admitted is never split this way, so
        admission always moves). A prompt's first chunk yields no token, and computed now it
        lengthens this step for every request in it: on a 2-core CPU, two 1,024-token
        prompts of four clients shared a 5.3 s step and the second's last two tokens a 2.8 s
        one. With an ITL target, time sizes the chunks instead (`_time_budget`)."""
        remaining = request.num_tokens - request.num_computed_tokens
        return self._shape is None and 0 < num_new < remaining <= room

    def _holds_admission(self, request: Request) -> bool:
        """A long prompt waits while a decoding request is about to reach its max_tokens, at
        most `finish_first_tokens` steps in a row. Four clients of 1,024-token prompts and 16
        tokens each on a 2-core CPU: a response's last one or two tokens each waited a 2.6 s
        prefill step that a 60 ms decode step would have ended first. Not with an ITL target,
        whose chunks bound the wait already."""
        limit = self.config.finish_first_tokens
        if (limit <= 0 or self._shape is not None
                or request.num_tokens - request.num_computed_tokens <= FINISH_FIRST_PROMPT_TOKENS):
            return False
        ending = any(0 < r.params.max_tokens - len(r.output_token_ids) - r.num_pending_tokens
                     <= limit for r in self.running if r.output_token_ids)
        if not ending or self._held_steps >= limit:
            self._held_steps = 0  # this prompt goes now; the next may be held again
            return False
        self._held_steps += 1
        return True

    def _num_seqs(self) -> int:
        return len(self.running) + len(self.pulling)

    def _admit_pull(self, request: Request, hit: int, remote: int) -> bool:
        """Give the prompt its blocks (prefix hits + fresh ones for the `remote` tokens) and
        let the connector fill them; the request waits in `pulling` until it has."""
        if not self.kv.allocate_slots(request, remote):
            self.kv.free(request)
            request.num_computed_tokens = 0
            return False
        self.kv.pool.record_lookup(request.num_prompt_tokens, hit)
        self.waiting.remove(request)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        request.scheduled_time = request.scheduled_time or time.monotonic()
        self.pulling[request.request_id] = request
        self.connector.blocks_allocated(request, request.block_ids, hit)
        return True
