"""Arrival counters for kernels whose last program to finish a piece of work merges it.

Split-K GEMV and split-KV decode attention write partial results, then each program bumps a
counter; the one that arrives last merges the partials and resets the counter to zero. That
is one launch where a separate reduce kernel would be two. The counters are allocated once
per device and never freed (a captured CUDA graph keeps their address), and every launch
leaves them zero again; two such launches must not run concurrently on different streams.
"""

from __future__ import annotations

import torch

MAX_COUNTERS = 1 << 16  # pieces of work one launch may merge this way

_counters: dict[torch.device, torch.Tensor] = {}


def counters_for(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters on `device`, shared by every kernel that merges this way."""
    if device not in _counters:
        _counters[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]
