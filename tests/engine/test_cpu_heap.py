"""A CPU engine process keeps freed memory for the next step's tensors: the same activations
allocated and freed again page-fault far less than under glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# six 8 MB activations and their products, freed together: what one prefill step does
CHILD = """
import resource, torch
from pdserve.cpu_heap import keep_cpu_heap
kept = keep_cpu_heap()
def step():
    xs = [torch.ones(2 * 2**20) for _ in range(6)]
    ys = [x * 2 for x in xs]
    del xs, ys
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(keep_heap: str) -> tuple[bool, int]:
    env = {**os.environ, "PDSERVE_CPU_KEEP_HEAP": keep_heap}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_heap_page_faults_far_less_than_glibc_defaults():
    kept, faults_kept = page_faults("1")
    default, faults_default = page_faults("0")  # the switch off: glibc's own thresholds
    assert kept and not default
    assert faults_default > 20 * 6 * 8 * 2**20 / 4096 / 2  # defaults: most steps fault again
    assert faults_kept < faults_default / 5
