"""Discrete-event simulation of a deployment under a workload, reported as `pdserve bench`
reports a measured run (same JSON: bench/metrics.py `summarize`, bench/report.py).

Events on one virtual clock: a request arrives at the router; the router's pick
(routing.py) sends it whole to one instance, or to a prefill instance with max_tokens=1;
P's answer reaches the client (TTFT) and the router, which picks D; D admits it, pulls the
prompt's KV (`Profile.transfer_seconds`), tells P to free it, and decodes. Every instance
is a `SimInstance`: the real Scheduler, stepping when the clock reaches its step's end.
The router's per-request overhead delays each hop to an instance.

Instances share one host: while another instance computes, a step progresses at the rate
its profile measured beside a neighbour (`Profile.corun`); each start or end of a step
re-times the steps running then.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.metrics import summarize
from pdserve.bench.report import build_result
from pdserve.bench.request import RequestRecord
from pdserve.config import SchedulerConfig
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.planner.instance import OUTPUT_TOKEN, SimHandoff, SimInstance, StepTiming
from pdserve.planner.layouts import SimLayout
from pdserve.planner.profile import Profile
from pdserve.planner.routing import InstanceLoad, LeastLoadedPicker, Picker


@dataclass
class SimRequest:
    """One request of the workload: its tokens, when it arrives, and what it saw."""

    index: int
    prompt_ids: list[int]
    output_len: int
    arrival_s: float
    category: str = ""
    slo_ms: dict[str, float] = field(default_factory=dict)
    chunk_s: list[float] = field(default_factory=list)  # when the client got each token

    def record(self) -> RequestRecord:
        """The bench's record of this request, as if a client had measured it."""
        rec = RequestRecord(self.index, len(self.prompt_ids), self.output_len, self.category,
                            self.arrival_s, self.arrival_s, send_s=self.arrival_s,
                            chunk_s=list(self.chunk_s), slo_ms=dict(self.slo_ms))
        rec.end_s = self.chunk_s[-1] if self.chunk_s else self.arrival_s
        rec.usage_prompt_tokens = len(self.prompt_ids)
        rec.usage_completion_tokens = len(self.chunk_s)
        if len(self.chunk_s) < self.output_len:
            rec.error = "unfinished when the simulation stopped"
        return rec


@dataclass
class RunningStep:
    """A step in progress, in seconds of work done alone: it runs at rate 1 alone, slower
    beside a busy neighbour."""

    timing: StepTiming
    done_s: float = 0.0  # alone-seconds of work done by `since`
    since: float = 0.0
    rate: float = 1.0
    end: float | None = None  # when it ends at `rate` (None: not scheduled yet)
    token: int = 0  # its end event's: an end re-timed since is stale


@dataclass
class SimOptions:
    """How the simulated deployment runs beyond its layout."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transport: str | None = None  # None: the profile's fastest
    horizon_s: float = 3600.0  # stop here (virtual seconds) if it has not drained
    kv_cache_tokens: int | None = None  # per instance; None: the profile's


class Simulation:
    """One deployment, one workload: `run()` returns the requests with their token times."""

    def __init__(self, layout: SimLayout, profile: Profile, requests: list[SimRequest],
                 options: SimOptions | None = None, picker: Picker | None = None):
        self.layout, self.profile = layout, profile
        self.options = options or SimOptions()
        self.picker = picker or LeastLoadedPicker(layout.pd_min_prompt_tokens)
        self.requests = requests
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        tokens = self.options.kv_cache_tokens or profile.kv_cache_tokens
        self.instances: dict[str, SimInstance] = {}
        self.loads: dict[str, InstanceLoad] = {}
        for name, role, units in layout.instances():
            per_unit = units if profile.parallelism == "tensor_parallel" else 1  # TP: more HBM
            blocks = max(tokens * per_unit // profile.block_size, 2)
            self.instances[name] = SimInstance(
                name, role, profile.step_model(units), blocks, profile.block_size,
                self.options.scheduler, profile.max_model_len,
                lambda req, n, name=name: self._pull(name, req, n),
                profile.serving_overhead(units), profile.shared_step_model(units))
            self.loads[name] = InstanceLoad(name, role)
        self._running: dict[str, RunningStep] = {}
        self._tokens = itertools.count()
        self._owner: dict[str, SimRequest] = {}  # engine request id -> workload request
        self._p_request: dict[str, str] = {}  # D's engine request id -> P's (P holds its KV)

    # ---- the clock ---------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), action))

    def run(self) -> list[SimRequest]:
        for r in self.requests:
            self.at(r.arrival_s, lambda r=r: self._arrive(r))
        while self._events:
            t, _, action = heapq.heappop(self._events)
            if t > self.options.horizon_s:
                break
            self.now = t
            action()
        return self.requests

    # ---- the router --------------------------------------------------------------------

    def _arrive(self, r: SimRequest) -> None:
        route = self.picker.pick(len(r.prompt_ids), r.output_len, list(self.loads.values()))
        target = route.prefill if route.disaggregated else route.whole
        hop = self._hop(target)
        if route.disaggregated:
            self._charge(route.prefill, len(r.prompt_ids) + 1)
            req = self._engine_request(r, f"{r.index}-p", 1, SimHandoff(hold_for_decode=True))
            self.at(self.now + hop, lambda: self._send(route.prefill, req))
        else:
            self._charge(route.whole, len(r.prompt_ids) + r.output_len)
            req = self._engine_request(r, f"{r.index}", r.output_len, None)
            self.at(self.now + hop, lambda: self._send(route.whole, req))

    def _prefilled(self, p_name: str, p_req: Request) -> None:
        """P answered: the client has the first token; the router sends D the rest."""
        r = self._owner[p_req.request_id]
        self._uncharge(p_name, len(r.prompt_ids) + 1)
        if r.output_len <= 1:
            self.instances[p_name].release_held(p_req.request_id)
            return
        d_name = self.picker.pick_decode(list(self.loads.values()))
        self._charge(d_name, len(r.prompt_ids) + r.output_len)
        d_req = self._engine_request(r, f"{r.index}-d", r.output_len,
                                     SimHandoff(pull_from=p_name))
        d_req.output_token_ids = [OUTPUT_TOKEN]  # P's first token (engine.add_request)
        self._p_request[d_req.request_id] = p_req.request_id
        self.at(self.now + self._hop(d_name), lambda: self._send(d_name, d_req))

    def _hop(self, name: str) -> float:
        """From the router's decision to the request in `name`'s scheduler: the proxy, then
        the instance's HTTP handling, tokenizing and admission."""
        return self.profile.router_overhead_s + self.instances[name].serving.request_s

    def _charge(self, name: str, tokens: int) -> None:
        self.loads[name].outstanding_tokens += tokens
        self.loads[name].in_flight += 1

    def _uncharge(self, name: str, tokens: int) -> None:
        self.loads[name].outstanding_tokens -= tokens
        self.loads[name].in_flight -= 1

    # ---- the instances -----------------------------------------------------------------

    def _engine_request(self, r: SimRequest, rid: str, max_tokens: int,
                        handoff: SimHandoff | None) -> Request:
        req = Request(rid, list(r.prompt_ids), SamplingParams(max_tokens=max_tokens,
                                                              ignore_eos=True))
        req.handoff = handoff
        self._owner[rid] = r
        return req

    def _send(self, name: str, req: Request) -> None:
        self.instances[name].add(req)
        self._kick(name)

    def _kick(self, name: str) -> None:
        """Start the instance's next step if it is idle and has work."""
        inst = self.instances[name]
        if name not in self._running:
            timing = inst.start_step(self.now)
            if timing is not None:
                self._running[name] = RunningStep(timing, since=self.now)
                self._retime()

    def _retime(self) -> None:
        """The set of computing instances changed: bring each running step's work up to
        now, set its rate (alone, or beside a neighbour) and schedule its end again."""
        shared = len(self._running) > 1
        for name, step in self._running.items():
            step.done_s += (self.now - step.since) * step.rate
            step.since = self.now
            t = step.timing
            rate = t.alone_s / t.shared_s if shared and t.shared_s > 0 else 1.0
            end = self.now + max(t.alone_s - step.done_s, 0.0) / rate
            if rate != step.rate or step.end is None:
                step.rate, step.end, step.token = rate, end, next(self._tokens)
                self.at(end, lambda name=name, token=step.token: self._step_end(name, token))

    def _step_end(self, name: str, token: int) -> None:
        step = self._running.get(name)
        if step is None or step.token != token:
            return  # re-timed since: a later event ends it
        del self._running[name]
        self._retime()  # the others lose their neighbour
        self._step_done(name)

    def _step_done(self, name: str) -> None:
        inst = self.instances[name]
        result = inst.finish_step(self.now)
        for req in result.sampled:
            self._owner[req.request_id].chunk_s.append(self.now)
        for req in result.finished:
            r = self._owner[req.request_id]
            if inst.role == "prefill" and req.handoff is not None:
                self.at(self.now + self.profile.router_overhead_s,
                        lambda req=req: self._prefilled(name, req))
            else:
                self._uncharge(name, len(r.prompt_ids) + r.output_len)
        self._kick(name)

    def _pull(self, d_name: str, req: Request, num_tokens: int) -> None:
        """D admitted a prefilled request: its KV lands after the transfer, P frees it."""
        seconds = self.profile.transfer_seconds(num_tokens, self.options.transport)
        p_name, p_rid = req.handoff.pull_from, self._p_request[req.request_id]

        def landed() -> None:
            self.instances[p_name].release_held(p_rid)
            self.instances[d_name].pull_landed(req.request_id)
            self._kick(d_name)
            self._kick(p_name)  # freed blocks may let a waiting prefill in

        self.at(self.now + seconds, landed)


def simulate(layout: SimLayout, profile: Profile, requests: list[SimRequest],
             options: SimOptions | None = None, slos_ms: dict[str, float] | None = None,
             meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bench JSON (pdserve bench's fields) this layout is predicted to give."""
    sim = Simulation(layout, profile, [_fresh(r) for r in requests], options)
    done = sim.run()
    records = [r.record() for r in done]
    start = min((r.arrival_s for r in done), default=0.0)
    end = max((rec.end_s for rec in records), default=start)
    summary = summarize(records, end - start, slos_ms or {})
    info = {"backend": "pdserve-plan", "label": layout.label(), "model_id": profile.model,
            "predicted": True, "layout": layout.to_dict(), "profile_device": profile.device,
            "devices_used": layout.units(), "goodput_slos_ms": slos_ms or None,
            "num_prompts": len(done),
            "instance_busy_fraction": {n: i.busy_s / max(end - start, 1e-9)
                                       for n, i in sim.instances.items()},
            "num_preemptions": sum(i.scheduler.num_preemptions
                                   for i in sim.instances.values())}
    info.update(meta or {})
    return build_result(summary, info)


def _fresh(r: SimRequest) -> SimRequest:
    return SimRequest(r.index, r.prompt_ids, r.output_len, r.arrival_s, r.category, r.slo_ms)

