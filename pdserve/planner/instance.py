"""One simulated engine instance: the real `Scheduler` over a real `BlockPool`, on a virtual
clock, its steps timed by a `StepTimeModel` instead of run.

It does what `Engine.step` does around the model (engine/engine.py): collect finished
pulls, schedule, advance each scheduled request's computed tokens, publish full blocks,
append a token to each request that samples, stop at max_tokens, free or hold its blocks.
The KV connector is `SimConnector`: P holds a prefill's blocks until D's pull ends; D pulls
a prompt's KV in `transfer_seconds`, the simulator's event loop says when it lands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.blocks import BlockPool
from pdserve.engine.connector import ConnectorStats
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.step_time import StepShape, StepTimeModel
from pdserve.planner.served import ServingOverhead

OUTPUT_TOKEN = 0  # the token the simulator "samples": only its count matters


@dataclass
class SimHandoff:
    """The simulator's stand-in for a typed KV hand-off: which side of P/D this request is."""

    hold_for_decode: bool = False  # on P: keep the KV for D after the first token
    pull_from: str | None = None  # on D: the prefill instance holding the prompt's KV
    pulled: bool = False  # D: the pull was started (a preempted request recomputes)


@dataclass
class SimConnector:
    """The scheduler's three questions (engine/connector.py), answered by the simulation."""

    start_pull: Callable[[Request, int], None]  # (request, tokens to move): the loop times it
    stats: ConnectorStats = field(default_factory=ConnectorStats)

    def matched_remote_tokens(self, request: Request) -> int:
        h = request.handoff
        if not isinstance(h, SimHandoff) or h.pull_from is None or h.pulled:
            return 0
        return request.num_prompt_tokens - request.num_computed_tokens

    def blocks_allocated(self, request: Request, block_ids: list[int], hit: int) -> None:
        n = self.matched_remote_tokens(request)
        if n:
            request.handoff.pulled = True
            self.start_pull(request, n)

    def request_finished(self, request: Request) -> tuple[bool, None]:
        h = request.handoff
        keep = isinstance(h, SimHandoff) and h.hold_for_decode \
            and request.status != RequestStatus.FINISHED_ABORTED
        return keep, None


@dataclass
class StepResult:
    """What one step gave: requests that got a token, those that finished."""

    sampled: list[Request]
    finished: list[Request]


@dataclass
class StepTiming:
    """A planned step's duration alone, and while another instance on the host computes."""

    alone_s: float
    shared_s: float


class SimInstance:
    """An engine on a virtual clock: `start_step` plans and times a step, `finish_step`
    applies it when the clock reaches its end (the simulation says when: simulate.py)."""

    def __init__(self, name: str, role: str, step_time: StepTimeModel, num_blocks: int,
                 block_size: int, config: SchedulerConfig, max_model_len: int,
                 start_pull: Callable[[Request, int], None],
                 serving: ServingOverhead | None = None,
                 shared_step_time: StepTimeModel | None = None):
        self.name, self.role, self.step_time = name, role, step_time
        self.shared_step_time = shared_step_time or step_time  # beside a busy neighbour
        self.serving = serving or ServingOverhead()
        self.pool = BlockPool(num_blocks, block_size, True)
        self.connector = SimConnector(start_pull)
        self.scheduler = Scheduler(config, KVCacheManager(self.pool), self.connector, step_time)
        self.max_model_len = max_model_len
        self._started = 0.0  # the running step's start
        self._plan: SchedulerOutput | None = None
        self._landed: list[str] = []  # pulls that ended while a step ran: taken at the next
        self.held: dict[str, list[int]] = {}  # P: blocks kept for D, by request id
        self.num_steps = 0
        self.busy_s = 0.0

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def pull_landed(self, request_id: str) -> None:
        self._landed.append(request_id)

    def release_held(self, request_id: str) -> None:
        """P: D has pulled (or will never pull) this prefill's KV: free its blocks."""
        blocks = self.held.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)

    def start_step(self, now: float) -> StepTiming | None:
        """Plan the next step (as `Engine.step` does) and time it; None: nothing to run."""
        for rid in self._landed:
            self.scheduler.finish_pull(rid, True)
        self._landed = []
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return None
        rows = sum(1 for s in plan.scheduled if s.samples)  # tokens this step streams
        shape = step_shape(plan)
        timing = StepTiming(
            self.serving.served_seconds(self.step_time.seconds(shape), rows),
            self.serving.served_seconds(self.shared_step_time.seconds(shape), rows))
        self._plan, self._started = plan, now
        self.num_steps += 1
        return timing

    def finish_step(self, now: float) -> StepResult:
        """Apply the planned step: tokens computed, one sampled per request that samples."""
        self.busy_s += now - self._started
        plan, self._plan = self._plan, None
        sampled, finished = [], []
        for s in plan.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.scheduler.kv.publish_full_blocks(s.request)
        for s in plan.scheduled:
            if not s.samples:
                continue
            r = s.request
            r.output_token_ids.append(OUTPUT_TOKEN)
            sampled.append(r)
            if len(r.output_token_ids) >= r.params.max_tokens or r.num_tokens >= self.max_model_len:
                r.status = RequestStatus.FINISHED_LENGTH
                self._release(r)
                finished.append(r)
        return StepResult(sampled, finished)

    def _release(self, request: Request) -> None:
        keep, _ = self.connector.request_finished(request)
        self.scheduler.remove(request, free_blocks=not keep)
        if keep:
            self.held[request.request_id] = request.block_ids
            request.block_ids = []


def step_shape(plan: SchedulerOutput) -> StepShape:
    """The step's shape in the step-time model's terms, before it is applied."""
    shape = StepShape()
    for s in plan.scheduled:
        r = s.request
        if s.num_new_tokens == 1 and r.num_tokens - r.num_computed_tokens == 1:
            shape.add_decode(r.num_tokens)
        else:
            shape.add_prefill(s.num_new_tokens, r.num_computed_tokens)
    return shape
