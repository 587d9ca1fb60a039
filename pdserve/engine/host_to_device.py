"""Small host lists to the device without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which synchronizes the
stream: the host would stall until every queued kernel ran. Staging through pinned memory
makes the copy one more queued operation, which the async scheduling loop depends on.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a 1-D tensor on `device`; on CUDA, queued behind the work already there."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    # the pinned block returns to PyTorch's host cache only after this copy has run
    return host.pin_memory().to(device, non_blocking=True)
