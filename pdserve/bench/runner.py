"""Drives the load: open loop (scheduled arrivals) or closed loop (fixed concurrency)."""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pdserve.bench.arrivals import arrival_offsets, arrival_offsets_for_duration
from pdserve.bench.client import EndpointConfig, new_session, send_request
from pdserve.bench.overload import OverloadRule
from pdserve.bench.request import RequestRecord, RequestSpec

# (index, spec, scheduled offset in s); index is the request's position in the run.
PlanItem = tuple[int, RequestSpec, float]

LAG_WARN_S = 0.05  # warn when the client sends this much later than it meant to


@dataclass
class LoadSpec:
    """How to offer load. rate=inf with max_concurrency=N is a closed loop of N users."""

    request_rate: float = math.inf
    arrival: str = "poisson"  # poisson | gamma | constant
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_prompts: int | None = None
    duration_s: float | None = None
    num_warmups: int = 0
    seed: int = 0
    num_processes: int = 1
    overload: OverloadRule | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.num_prompts is None and self.duration_s is None:
            raise ValueError("give a request count (--num-prompts) or a --duration")
        if self.duration_s and math.isinf(self.request_rate) and not self.max_concurrency:
            raise ValueError("--duration needs a finite --request-rate or --max-concurrency")


@dataclass
class RunResult:
    """The measured records of one run (warm-ups excluded) and how it ended."""

    records: list[RequestRecord]
    duration_s: float  # wall clock from the first scheduled send to the last response
    early_stop_reason: str | None = None
    warnings: list[str] = field(default_factory=list)


def plan(specs: list[RequestSpec], load: LoadSpec) -> Iterator[PlanItem]:
    """The run's requests with their scheduled times; endless for a timed closed loop."""
    if any(s.arrival_s is not None for s in specs):  # trace replay keeps its own clock
        items = sorted(specs, key=lambda s: s.arrival_s or 0.0)[: load.num_prompts]
        return iter([(i, s, float(s.arrival_s or 0.0)) for i, s in enumerate(items)])
    if load.num_prompts is not None:
        n = load.num_prompts
        offsets = arrival_offsets(n, load.request_rate, load.arrival, load.burstiness, load.seed)
    elif math.isinf(load.request_rate):  # closed loop for a duration: cycle the workload
        return ((i, s, 0.0) for i, s in enumerate(itertools.cycle(specs)))
    else:
        offsets = arrival_offsets_for_duration(
            load.duration_s or 0.0, load.request_rate, load.arrival, load.burstiness, load.seed
        )
    cycled = itertools.cycle(specs)
    return iter([(i, next(cycled), float(t)) for i, t in enumerate(offsets)])


@dataclass
class _Progress:
    arrived: int = 0  # requests whose scheduled time has passed
    done: int = 0
    last_release_s: float = 0.0  # when a concurrency slot last freed
    max_lag_s: float = 0.0
    warned_lag_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def note_lag(self, lag: float) -> None:
        self.max_lag_s = max(self.max_lag_s, lag)
        if lag > LAG_WARN_S and lag > 2 * self.warned_lag_s:  # warn again each time it doubles
            self.warned_lag_s = lag
            msg = (
                f"client is {lag * 1000:.0f} ms behind schedule: it may be the bottleneck "
                "(try --num-client-processes)"
            )
            self.warnings.append(msg)
            print(f"WARNING: {msg}", file=sys.stderr)


async def run_items(
    items: Iterable[PlanItem],
    cfg: EndpointConfig,
    t0: float,
    max_concurrency: int | None = None,
    deadline_s: float | None = None,
    overload: OverloadRule | None = None,
    on_done: Callable[[], None] | None = None,
    on_arrive: Callable[[], None] | None = None,
    stop_flag: Callable[[], str | None] | None = None,
) -> tuple[list[RequestRecord], str | None, _Progress]:
    """Send `items` on their schedule from monotonic `t0`; returns records and stop reason.

    `on_arrive`/`on_done` count arrivals and completions for a caller watching the backlog
    (several processes); `stop_flag` returns a reason when that caller says stop.
    """
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = _Progress()
    stop_reason: list[str] = []
    tasks: set[asyncio.Task] = set()
    records: list[RequestRecord] = []

    async def one(session, spec: RequestSpec, rec: RequestRecord) -> None:
        try:
            await send_request(session, cfg, spec, rec, t0)
        finally:
            if sem:
                progress.last_release_s = time.monotonic() - t0
                sem.release()
            progress.done += 1
            if on_done is not None:
                on_done()

    async def watch() -> None:
        while overload is not None or stop_flag is not None:
            await asyncio.sleep(overload.window_s if overload else 0.2)
            reason = overload.observe(progress.arrived - progress.done) if overload else None
            reason = reason or (stop_flag() if stop_flag else None)
            if reason:
                stop_reason.append(reason)
                return

    watcher = asyncio.create_task(watch())
    async with new_session() as session:
        for index, spec, sched in items:
            if deadline_s is not None and sched >= deadline_s:
                break
            delay = sched - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            progress.arrived += 1
            if on_arrive is not None:
                on_arrive()
            ready = sched
            if sem is not None:
                await sem.acquire()
                # a slot freed after the arrival makes the request ready then, not earlier
                ready = max(sched, progress.last_release_s)
            now = time.monotonic() - t0
            if stop_reason or (deadline_s is not None and now >= deadline_s):
                if sem is not None:
                    sem.release()
                break
            progress.note_lag(now - ready)
            rec = RequestRecord(
                index=index,
                prompt_len=spec.prompt_len,
                requested_output_len=spec.output_len,
                category=spec.category,
                scheduled_s=sched,
                ready_s=ready,
                slo_ms=dict(spec.slo_ms),
                vision_len=spec.vision_len,
            )
            records.append(rec)
            task = asyncio.create_task(one(session, spec, rec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks and not stop_reason:
            await asyncio.wait(set(tasks), timeout=0.2)
        for task in list(tasks):  # early stop: abort what is in flight (client disconnect)
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    watcher.cancel()
    return records, (stop_reason[0] if stop_reason else None), progress


async def run_warmup(
    specs: list[RequestSpec], cfg: EndpointConfig, n: int, concurrency: int | None
) -> None:
    """Send `n` requests before the measured run (to fill caches and compile); discarded."""
    if n <= 0:
        return
    cycled = itertools.cycle(specs)
    items = [(-1 - i, next(cycled), 0.0) for i in range(n)]
    await run_items(items, cfg, time.monotonic(), max_concurrency=concurrency or n)


def run_load(specs: list[RequestSpec], cfg: EndpointConfig, load: LoadSpec) -> RunResult:
    """Run one benchmark stage in this process (or several, see `multiproc`)."""
    load.validate()
    asyncio.run(run_warmup(specs, cfg, load.num_warmups, load.max_concurrency))
    if load.num_processes > 1:
        from pdserve.bench.multiproc import run_multiprocess

        return run_multiprocess(specs, cfg, load)
    return asyncio.run(_run_single(specs, cfg, load))


async def _run_single(specs: list[RequestSpec], cfg: EndpointConfig, load: LoadSpec) -> RunResult:
    items = plan(specs, load)
    bar = _progress_bar(load, specs)
    t0 = time.monotonic()
    records, reason, progress = await run_items(
        items,
        cfg,
        t0,
        max_concurrency=load.max_concurrency,
        deadline_s=load.duration_s,
        overload=load.overload,
        on_done=(lambda: bar.update(1)) if bar else None,
    )
    duration = _duration(records, time.monotonic() - t0)
    if bar:
        bar.close()
    return RunResult(records, duration, reason, progress.warnings)


def _duration(records: list[RequestRecord], fallback: float) -> float:
    """From the first scheduled send (t=0) to the end of the last measured response."""
    ends = [r.end_s for r in records if not r.cancelled]
    return max(ends) if ends else fallback


def _progress_bar(load: LoadSpec, specs: list[RequestSpec]):
    if not load.progress:
        return None
    from tqdm import tqdm

    total = load.num_prompts if load.num_prompts is not None else None
    if any(s.arrival_s is not None for s in specs):
        total = min(len(specs), load.num_prompts or len(specs))
    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr, smoothing=0.1)
