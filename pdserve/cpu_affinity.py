"""CPU pinning of a server and everything it starts: `--cpu-affinity 0-3,8` (Linux's cpu-list
syntax, as taskset and vLLM's VLLM_CPU_OMP_THREADS_BIND write it), checked against the cores
this process may use, and applied before the engine process is started (it inherits it)."""

from __future__ import annotations

import os

MAX_CPU = 4096  # a bound on what a list may name: no host has more logical CPUs


def parse_cpu_list(text: str) -> set[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}; a ValueError that says what is wrong otherwise."""
    cpus: set[int] = set()
    if not text or len(text) > 1024:
        raise ValueError("a CPU list is 1-1024 characters, e.g. 0-3,8")
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{part!r} is not a CPU or a range of CPUs (e.g. 2 or 0-3)")
        first, last = int(low), int(high) if sep else int(low)
        if last < first or last >= MAX_CPU:
            raise ValueError(f"{part!r}: a range goes up, below CPU {MAX_CPU}")
        cpus.update(range(first, last + 1))
    return cpus


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def pin_to(text: str) -> set[int]:
    """Pin this process (and the processes it starts) to the CPUs of `text`."""
    cpus = parse_cpu_list(text)
    missing = cpus - usable_cpus()
    if missing:
        raise ValueError(f"--cpu-affinity names CPUs {sorted(missing)} this process may not "
                         f"use (it may use {format_cpu_list(usable_cpus())})")
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpu-affinity needs Linux (sched_setaffinity)")
    os.sched_setaffinity(0, cpus)
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5"."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(_span(run))
            run = []
        run.append(c)
    if run:
        out.append(_span(run))
    return ",".join(out)


def _span(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
