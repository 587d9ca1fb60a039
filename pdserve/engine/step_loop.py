"""The engine's one step loop, for every role and tensor-parallel size.

A step is plan -> build inputs -> forward -> sample -> read the tokens back -> apply them
(append, check stops, finish). `depth` is how many steps may stay in flight between calls:

- depth 0 (serial): each step is read back and applied before `step()` returns, so the
  host and the device take turns. The CPU default: there the device is the host.
- depth 1 (overlapped, "async scheduling"): step k's sampled tokens stay on the device.
  Each request that sampled at step k counts one pending token
  (`Request.num_pending_tokens`), so the scheduler gives it a one-token decode in step
  k+1; that token's input id is copied on the device from step k's tokens into the
  step's input buffer before the forward (with tensor parallelism, rank 0 then broadcasts
  the ids to the other ranks). Only once step k+1 is queued does the host wait for step
  k's tokens and apply them. The GPU default.

A step runs serially at any depth when a request that samples in it needs its output
history on the host (penalties, min_tokens) or asks for logprobs.

Each role's part is outside the loop: the KV connector (engine/connector.py) is polled
before each plan (pulls that landed, leases that ended) and told of each finished request
(P keeps a prefill's blocks for D). A request that finished or was aborted while the step
in flight still computes it keeps its blocks until that step has been read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdserve.engine.batch_inputs import StepInputs
from pdserve.engine.handoff import HeldPrefill
from pdserve.engine.host_to_device import to_device
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.request import Request
from pdserve.engine.sampler import sample, sample_tokens
from pdserve.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine

MAX_DEPTH = 1  # steps in flight between calls; deeper needs more pending tokens per request


def samples_without_history(request: Request) -> bool:
    """Its next token can be drawn before its previous one is known on the host."""
    p = request.params
    return (p.logprobs is None and p.repetition_penalty == 1.0 and not p.frequency_penalty
            and not p.presence_penalty and len(request.output_token_ids) >= p.min_tokens
            and request.grammar is None)  # its mask needs the previous token accepted


@dataclass
class PendingIds:
    """Input ids the host does not know yet: rows `dst` of a step's input ids take rows
    `src` of the previous step's sampled tokens, still on the device."""

    dst: list[int]
    src: list[int]
    tokens: torch.Tensor  # the previous step's sampled tokens [N] on the device

    def apply(self, x: StepInputs) -> None:
        n = len(self.dst)
        index = to_device(self.dst + self.src, torch.long, x.input_ids.device)  # one copy
        x.input_ids.index_copy_(0, index[:n], self.tokens.index_select(0, index[n:]))


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not applied yet."""

    plan: SchedulerOutput
    sampling: list[Request]  # the requests that sample, in the order of the token rows
    tokens: torch.Tensor | None = None  # [N] on the device, for the next step's input ids
    host_tokens: torch.Tensor | None = None  # their pinned copy, complete once `copied` passed
    copied: torch.cuda.Event | None = None
    token_ids: list[int] | None = None  # set once read back
    logprobs: list[TokenLogprob | None] | None = None  # serial steps only
    counted: bool = False  # its tokens are counted in the requests' num_pending_tokens
    rows: dict[int, int] = field(default_factory=dict)  # id(request) -> row of `tokens`
    scheduled: set[int] = field(default_factory=set)  # id(request) of all it computes
    release: list[Request] = field(default_factory=list)  # ended meanwhile: free after it

    def __post_init__(self) -> None:
        self.rows = {id(r): i for i, r in enumerate(self.sampling)}
        self.scheduled = {id(s.request) for s in self.plan.scheduled}

    def start_copy(self) -> None:
        """Queue the copy of the tokens to the host behind the step itself."""
        if self.tokens.device.type != "cuda":
            self.host_tokens = self.tokens  # CPU ops have already run
            return
        self.host_tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype,
                                       pin_memory=True)
        self.host_tokens.copy_(self.tokens, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def read(self) -> list[int]:
        """The sampled ids; waits for this step only, not for any step queued after it."""
        if self.token_ids is None:
            if self.copied is not None:
                self.copied.synchronize()
            self.token_ids = self.host_tokens.tolist()
        return self.token_ids

    def pending_ids(self, plan: SchedulerOutput) -> PendingIds | None:
        """Where `plan` (the next step) decodes a token of this step that is not read back."""
        dst: list[int] = []
        src: list[int] = []
        t = 0
        for s in plan.scheduled:
            if s.request.num_pending_tokens:  # a one-token decode of this step's sample
                dst.append(t)
                src.append(self.rows[id(s.request)])
            t += s.num_new_tokens
        return PendingIds(dst, src, self.tokens) if dst else None


class StepLoop:
    """`Engine.step()`: at most `depth` steps stay in flight between calls (0 or 1)."""

    def __init__(self, engine: Engine, depth: int) -> None:
        if not 0 <= depth <= MAX_DEPTH:
            raise ValueError(f"step loop depth must be 0..{MAX_DEPTH}, not {depth}")
        self.engine = engine
        self.depth = depth
        first = engine.runner.inputs
        # overlapped: two sets of pinned input buffers taken in turn, as the host fills one
        # while the device may not yet have copied the other (the step in flight) in
        self.builders = [first, first.like()] if depth else [first]
        self.turn = 0
        self.in_flight: LaunchedStep | None = None

    def step(self) -> list[RequestOutput]:
        """Plan and launch the next step, apply the previous one; the outputs of both."""
        e = self.engine
        outputs = e.take_pending_outputs()
        e.collect_transfers()  # before planning: pulls that landed decode in this step
        prev, self.in_flight = self.in_flight, None
        plan = e.scheduler.schedule()
        overlap = self.depth > 0 and all(
            samples_without_history(s.request) for s in plan.scheduled if s.samples)
        if prev is not None and not (plan.scheduled and overlap):
            outputs += self._apply(prev)  # this step needs step k's tokens on the host
            prev = None
            plan.scheduled = [s for s in plan.scheduled if not s.request.is_finished]
        if plan.scheduled:
            self.in_flight = self._launch(plan, prev, serial=not overlap)
        elif prev is None and (e.scheduler.pulling or e.scheduler.aborted_pulls):
            e.connector.wait(0.005)  # nothing to compute until a pull lands
        if prev is not None:
            outputs += self._apply(prev)  # the device is busy with the next step meanwhile
        launched = self.in_flight
        if launched is None:
            return outputs
        if not overlap or all(s.request.is_finished for s in launched.plan.scheduled):
            self.in_flight = None  # serial, or nothing alive in it: read it back now
            return outputs + self._apply(launched)
        for r in launched.sampling:
            if not r.is_finished:
                r.num_pending_tokens += 1
        launched.counted = True
        return outputs

    def release(self, request: Request) -> HeldPrefill | None:
        """Take a finished or aborted request out of the scheduler. Its blocks are freed now,
        after the step in flight if that step computes it, or never by us if the connector
        keeps them (P: held for D; the step in flight, if any, writes only past the prompt,
        which D does not read)."""
        e = self.engine
        keep, held = e.connector.request_finished(request)
        computing = self.in_flight is not None and id(request) in self.in_flight.scheduled
        e.scheduler.remove(request, free_blocks=not (keep or computing))
        if keep:
            request.block_ids = []  # the connector owns the references now
        elif computing:
            self.in_flight.release.append(request)
        return held

    @torch.inference_mode()
    def _launch(self, plan: SchedulerOutput, prev: LaunchedStep | None,
                serial: bool) -> LaunchedStep:
        e = self.engine
        builder = self.builders[self.turn]
        self.turn = (self.turn + 1) % len(self.builders)
        pending = prev.pending_ids(plan) if prev is not None else None
        logits = e.runner.launch(plan, builder, pending)
        sampling = [s.request for s in plan.scheduled if s.samples]
        for s in plan.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            e.kv.publish_full_blocks(s.request)
        if serial:
            token_ids, logprobs = sample(logits, sampling, e.eos_token_ids)
            return LaunchedStep(plan, sampling, token_ids=token_ids, logprobs=logprobs)
        launched = LaunchedStep(plan, sampling, sample_tokens(logits, sampling,
                                                              e.eos_token_ids))
        launched.start_copy()
        return launched

    def _apply(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read a step's tokens back, append them, check stops; the step has fully run."""
        e = self.engine
        token_ids = step.read()
        for r in step.release:
            e.kv.free(r)
        logprobs = step.logprobs or [None] * len(token_ids)
        outputs = []
        for r, token, logprob in zip(step.sampling, token_ids, logprobs):
            if r.is_finished:  # aborted, or stopped at the step before: not its token
                continue
            if step.counted:
                r.num_pending_tokens -= 1
            r.output_token_ids.append(token)
            e.kv.publish_full_blocks(r)
            e.check_stop(r, token)
            out = e.output(r, [token], logprob)
            if r.is_finished:
                out.held = self.release(r)
                del e.requests[r.request_id]
            outputs.append(out)
        return outputs
