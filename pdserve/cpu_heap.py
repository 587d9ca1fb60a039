"""glibc's malloc told to keep freed memory for reuse, in CPU engine processes.

A CPU engine allocates and frees tens of MB of activations every step. By default glibc
hands large blocks back to the kernel (mmap'd blocks, or the heap's top trimmed), so each
step's tensors page-fault in again: three 1,024-token prefills of the embedded model on one
thread (and three of 256) took 950k minor page faults and 3.13 s each, and 519k and 2.97 s
with both thresholds raised as here (docs/PERF.md). vLLM's CPU guide gets the same effect
from tcmalloc via LD_PRELOAD; a running process can only change glibc's own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from pdserve import switches

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling: larger blocks are still mmap'd
TRIM_THRESHOLD_BYTES = 2**30  # free memory at the heap's top stays mapped up to 1 GiB


def keep_cpu_heap() -> bool:
    """Raise both thresholds (setting one turns off glibc's moving of both, so both are set);
    False where the switch is off or the C library has no mallopt (not glibc)."""
    if not switches.SWITCHES.cpu_keep_heap:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
