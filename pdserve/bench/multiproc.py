"""Spread one run over several client processes when one event loop cannot keep up.

The parent plans the whole schedule and deals it round-robin to the children; all of them
share one monotonic t0 (CLOCK_MONOTONIC is system-wide), so arrivals keep their absolute
times and the records merge as if one client had sent them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing as mp
import sys
import time

from pdserve.bench.client import EndpointConfig
from pdserve.bench.request import RequestRecord, RequestSpec
from pdserve.bench.runner import LoadSpec, PlanItem, RunResult, _duration, plan, run_items


def _split(total: int | None, parts: int) -> list[int | None]:
    if total is None:
        return [None] * parts
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _child(
    items: list[PlanItem],
    cycle_stride: int,
    cfg: EndpointConfig,
    max_concurrency: int | None,
    deadline_s: float | None,
    ready,
    start,
    t0_value,
    counter,
    arrived,
    stop,
    results,
    slot: int,
) -> None:
    def bump() -> None:
        with counter.get_lock():
            counter.value += 1

    def arrive() -> None:
        with arrived.get_lock():
            arrived.value += 1

    def stop_flag() -> str | None:
        return (
            "over-saturated (backlog across client processes kept growing)"
            if stop.is_set()
            else None
        )

    if cycle_stride:  # timed closed loop: cycle this shard's prompts with fresh indices
        base = list(items)
        seq = ((i + k * cycle_stride, s, t) for k in itertools.count() for i, s, t in base)
    else:
        seq = iter(items)
    ready.put(slot)
    start.wait()
    records, _, progress = asyncio.run(
        run_items(
            seq, cfg, t0_value.value, max_concurrency, deadline_s,
            on_done=bump, on_arrive=arrive, stop_flag=stop_flag,
        )
    )  # fmt: skip
    results.put((slot, records, progress.warnings))


def run_multiprocess(specs: list[RequestSpec], cfg: EndpointConfig, load: LoadSpec) -> RunResult:
    """Run `load` over `load.num_processes` processes and merge their records."""
    n = load.num_processes
    timed_closed_loop = load.num_prompts is None and math.isinf(load.request_rate)
    if timed_closed_loop:
        all_items = [(i, s, 0.0) for i, s in enumerate(specs)]
    else:
        all_items = list(plan(specs, load))
    ctx = mp.get_context("spawn")  # no inherited event loop or sockets
    ready, results = ctx.Queue(), ctx.Queue()
    start, t0_value, counter = ctx.Event(), ctx.Value("d", 0.0), ctx.Value("i", 0)
    arrived, stop = ctx.Value("i", 0), ctx.Event()
    shares = _split(load.max_concurrency, n)
    procs = []
    for slot in range(n):
        shard = all_items[slot::n]
        stride = len(all_items) if timed_closed_loop else 0
        args = (shard, stride, cfg, shares[slot], load.duration_s, ready, start, t0_value)
        more = (counter, arrived, stop, results, slot)
        p = ctx.Process(target=_child, args=(*args, *more), daemon=True)
        p.start()
        procs.append(p)
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.monotonic() + 0.05
    t0_value.value = t0
    start.set()
    bar = _bar(load, len(all_items), timed_closed_loop)
    merged: list[RequestRecord] = []
    warnings: list[str] = []
    pending = n
    rule = load.overload
    next_check = time.monotonic() + (rule.window_s if rule else math.inf)
    reason: str | None = None
    while pending:
        if rule is not None and reason is None and time.monotonic() >= next_check:
            next_check += rule.window_s  # the same rule as one process, on the summed counts
            reason = rule.observe(arrived.value - counter.value)
            if reason:
                stop.set()
        if bar is not None:
            bar.n = counter.value
            bar.refresh()
        try:
            _, records, warns = results.get(timeout=0.25)
        except Exception:  # queue.Empty: keep the bar moving
            continue
        merged.extend(records)
        warnings.extend(warns)
        pending -= 1
    for p in procs:
        p.join()
    if bar is not None:
        bar.n = counter.value
        bar.close()
    merged.sort(key=lambda r: r.index)
    return RunResult(merged, _duration(merged, time.monotonic() - t0), reason, warnings)


def _bar(load: LoadSpec, total: int, endless: bool):
    if not load.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=None if endless else total, desc="requests", unit="req", file=sys.stderr)
