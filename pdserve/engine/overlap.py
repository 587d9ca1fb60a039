"""Async scheduling: plan and queue step k+1 while the device still runs step k.

The serial step is schedule -> build inputs -> forward -> sample -> read tokens back ->
apply them, so the host and the device take turns. Here step k's sampled tokens stay on the
device. Each request that sampled at step k counts one pending token
(`Request.num_pending_tokens`), so the scheduler gives it a one-token decode in step k+1;
that token's input id is copied on the device from step k's tokens into the step's
input buffer before the forward (the CUDA graphs copy from there into their static one).
Only once step k+1 is queued does the host wait for step k's tokens and apply them.

A request that stopped at step k may already be in step k+1: its token from step k+1 is
dropped, and its blocks are freed once step k+1 has been read back. A step runs serially
(step k applied first, the step's own tokens read at once) when a request that samples in
it needs its output history on the host (penalties, min_tokens) or asks for logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdserve.engine.batch_inputs import StepInputs
from pdserve.engine.host_to_device import to_device
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.request import Request
from pdserve.engine.runner import forward_step
from pdserve.engine.sampler import sample, sample_tokens
from pdserve.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine


def samples_without_history(request: Request) -> bool:
    """Its next token can be drawn before its previous one is known on the host."""
    p = request.params
    return (p.logprobs is None and p.repetition_penalty == 1.0 and not p.frequency_penalty
            and not p.presence_penalty and len(request.output_token_ids) >= p.min_tokens
            and request.grammar is None)  # its mask needs the previous token accepted


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
    release: list[Request] = field(default_factory=list)  # stopped meanwhile: free after it

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


class OverlappedLoop:
    """`Engine.step()` with --async-scheduling: at most one step in flight between calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        first = engine.runner.inputs
        # two sets of pinned input buffers taken in turn: the host fills one while the
        # device may not yet have copied the other (the step in flight) in
        self.builders = [first, first.like()]
        self.turn = 0
        self.in_flight: LaunchedStep | None = None

    def step(self) -> list[RequestOutput]:
        e = self.engine
        outputs, e._pending = e._pending, []
        prev, self.in_flight = self.in_flight, None
        plan = e.scheduler.schedule()
        overlap = all(samples_without_history(s.request) for s in plan.scheduled if s.samples)
        if prev is not None and not (plan.scheduled and overlap):
            outputs += self._apply(prev)  # this step needs step k's tokens on the host
            prev = None
            plan.scheduled = [s for s in plan.scheduled if not s.request.is_finished]
        if plan.scheduled:
            self.in_flight = self._launch(plan, prev, serial=not overlap)
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

    @torch.inference_mode()
    def _launch(self, plan: SchedulerOutput, prev: LaunchedStep | None,
                serial: bool) -> LaunchedStep:
        e, runner = self.engine, self.engine.runner
        builder = self.builders[self.turn]
        self.turn ^= 1
        x = builder.build(plan)
        if prev is not None:
            self._feed_pending_ids(plan, prev, x)
        logits = forward_step(runner.model, runner.kv_caches, runner.graphs, x)
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

    @staticmethod
    def _feed_pending_ids(plan: SchedulerOutput, prev: LaunchedStep, x: StepInputs) -> None:
        """Input ids the host does not know yet: take them from step k's tokens on the device."""
        dst: list[int] = []
        src: list[int] = []
        t = 0
        for s in plan.scheduled:
            if s.request.num_pending_tokens:  # a one-token decode of step k's sample
                dst.append(t)
                src.append(prev.rows[id(s.request)])
            t += s.num_new_tokens
        if not dst:
            return
        n = len(dst)
        index = to_device(dst + src, torch.long, x.input_ids.device)  # one copy for both
        x.input_ids.index_copy_(0, index[:n], prev.tokens.index_select(0, index[n:]))

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
            e._check_stop(r, token)
            out = e._output(r, [token], logprob)
            if r.is_finished:
                self._finish(r)
            outputs.append(out)
        return outputs

    def _finish(self, request: Request) -> None:
        e = self.engine
        e.scheduler.remove(request, free_blocks=False)
        del e.requests[request.request_id]
        if self.in_flight is not None and id(request) in self.in_flight.scheduled:
            self.in_flight.release.append(request)  # the queued step still writes its KV
        else:
            e.kv.free(request)
