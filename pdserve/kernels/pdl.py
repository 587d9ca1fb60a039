"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

At batch 1 a decode step is ~230 short kernels, and each one's launch, ramp-up and tail cost
a few microseconds on top of its memory traffic. Launched with PDL, a kernel's programs may
start while the kernel before it finishes its last wave; each waits (`griddepcontrol.wait`)
for that kernel's completion and memory before touching anything, so the order of reads and
writes is the stream's, and only the launch and scheduling overlap. Every kernel that opts
in also lets the next one launch as soon as all of its own programs are running.

A kernel opts in with a `PDL: tl.constexpr` parameter, calls `wait_for_previous_kernel(PDL)`
first thing, and is launched with `**pdl_launch(tensor)`. `PDSERVE_PDL=0` turns it off
(pdserve/switches.py: read once, since captured CUDA graphs keep whatever they were captured
with).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pdserve import switches


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the kernel before is done and its writes visible, then let the
    next kernel launch once every program of this one has got here."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@cache
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel working on `t`: PDL where the device supports it."""
    if not (switches.SWITCHES.pdl and t.is_cuda):
        return {"PDL": False}  # the CPU interpreter cannot run griddepcontrol
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if not _hopper_or_later(index):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}
