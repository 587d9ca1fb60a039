"""How much a neighbour slows a step: instances on one host share its memory bandwidth and
caches, so a step may run longer while another instance computes (session 11 measured
decode steps 7-16% longer on this 2-core CPU; session 13's profiles, 0.94-1.00 of alone:
benchmarks/results/planner/README.md).

`measure_corun` times a few prefill-only and decode-only shapes on the profile's engine,
pinned to its own cores: alone, then while a neighbour computes on the next cores (another
process of the same model stepping through the profile's sampled shapes, as a second
instance would), then alone again. The slowdown of each kind is the median ratio of the
shared timing to the faster alone one. Run as a module, this file is that neighbour
(`python -m pdserve.planner.corun --help`).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.cpu_affinity import format_cpu_list, parse_cpu_list, usable_cpus
from pdserve.cpu_heap import keep_cpu_heap
from pdserve.engine.calibrate import StepSpec, sampled_specs, timed_step

log = logging.getLogger(__name__)

SHAPES_PER_KIND = 8  # prefill-only and decode-only shapes timed, each alone and shared
READY = "ready"


@dataclass
class CoRunSlowdown:
    """A step's time while another instance on the same host computes, over its time alone:
    the prefill terms scale by `prefill`, the base and decode terms by `decode`."""

    prefill: float = 1.0
    decode: float = 1.0
    measured: bool = False  # False: not measured (no free cores for a neighbour): no slowdown
    shapes: int = 0  # timed shapes behind the two ratios
    note: str = ""


def measure_corun(engine, threads: int, specs: list[StepSpec], repeats: int = 2
                  ) -> CoRunSlowdown:
    """Time `SHAPES_PER_KIND` prefill-only and decode-only shapes of `specs` on `engine`
    (`threads` torch threads, pinned to the first usable cores), alone and beside a
    neighbour on the next `threads` cores. Not measured where the host lacks those cores."""
    cpus = sorted(usable_cpus())
    if len(cpus) < 2 * threads:
        return CoRunSlowdown(note=f"{len(cpus)} usable CPUs: no room for a neighbour of "
                                  f"{threads} beside an instance of {threads}")
    own, other = set(cpus[:threads]), set(cpus[threads:2 * threads])
    chosen = _kind(specs, prefill=True) + _kind(specs, prefill=False)
    run, block = engine.runner, engine.args.cache.block_size

    def time_all() -> list[float]:
        return [min(timed_step(run, s, engine.num_blocks, block, engine.device)
                    for _ in range(repeats)) for s in chosen]

    with _pinned(own):
        before = time_all()
        with _neighbour(engine.args, threads, other):
            shared = time_all()
        after = time_all()  # alone again: a drift over the measurement is not the neighbour's
    ratios = [s / min(a, b) for a, b, s in zip(before, after, shared)]
    n = len(chosen) // 2
    prefill, decode = statistics.median(ratios[:n]), statistics.median(ratios[n:])
    # a neighbour never speeds a step up: a ratio under 1 is the timings' own noise
    out = CoRunSlowdown(max(prefill, 1.0), max(decode, 1.0), True, len(chosen),
                        f"pinned to CPU {format_cpu_list(own)}, the neighbour to "
                        f"{format_cpu_list(other)}; median ratios prefill {prefill:.3f}, "
                        f"decode {decode:.3f}")
    log.info("co-run on %d thread(s): %s", threads, out)
    return out


def _kind(specs: list[StepSpec], prefill: bool) -> list[StepSpec]:
    """The first SHAPES_PER_KIND prefill-only (or decode-only) shapes of `specs`."""
    picked = [s for s in specs if bool(s.prefills) == prefill and bool(s.decodes) != prefill]
    return picked[:SHAPES_PER_KIND]


@contextmanager
def _pinned(cpus: set[int]) -> Iterator[None]:
    """Every thread of this process (torch's pool included) on `cpus`, restored after."""
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    before = {t: os.sched_getaffinity(t) for t in tasks}
    for t in tasks:
        os.sched_setaffinity(t, cpus)
    try:
        yield
    finally:
        for t, mask in before.items():
            try:
                os.sched_setaffinity(t, mask)
            except OSError:  # the thread ended meanwhile
                pass


@contextmanager
def _neighbour(args: EngineArgs, threads: int, cpus: set[int]) -> Iterator[None]:
    """A neighbour process computing on `cpus` for the duration, started and stopped here."""
    cmd = [sys.executable, "-m", "pdserve.planner.corun", "--threads", str(threads),
           "--cpus", format_cpu_list(cpus), "--dtype", str(args.dtype),
           "--max-context", str(args.scheduler.max_model_len)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        said = []  # what it printed while loading the model, up to READY, or all if it died
        while (line := proc.stdout.readline()) and line.strip() != READY:
            said.append(line)
        if not line:
            raise RuntimeError(f"the co-run neighbour did not start (exit code {proc.wait()}"
                               f"; it said {''.join(said)[-500:]!r})")
        time.sleep(1.0)  # into its stepping loop
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def neighbour_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pdserve.planner.corun",
        description="The co-run probe's neighbour: load the model, print 'ready', then run "
                    "sampled prefill, decode and mixed steps until terminated.")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--cpus", required=True, help="CPU list to pin to, e.g. 1 or 2-3")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-context", type=int, default=1040)
    args = ap.parse_args(argv)
    # not pin_to: that keeps within this process's mask, inherited from the pinned profile
    os.sched_setaffinity(0, parse_cpu_list(args.cpus))
    torch.set_num_threads(args.threads)
    keep_cpu_heap()  # as a served CPU engine's process does
    from pdserve.engine.engine import Engine  # heavy: only the neighbour needs it here
    engine = Engine(EngineArgs(model=args.model, device="cpu",
                               dtype=args.dtype.removeprefix("torch."),
                               cache=CacheConfig(kv_cache_memory=128 * 2**20),
                               scheduler=SchedulerConfig(max_model_len=args.max_context)))
    specs = sampled_specs(60, 512, 16, args.max_context - 16, seed=1)
    print(READY, flush=True)
    block = engine.args.cache.block_size
    while True:
        for s in specs:
            timed_step(engine.runner, s, engine.num_blocks, block, engine.device)


if __name__ == "__main__":
    neighbour_main()
