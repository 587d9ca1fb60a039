"""What every transport's puller promises: its signature, its stats, its one error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.transfer.layout import HeadSlice


class TransferError(RuntimeError):
    """A pull failed (source down, timeout, lease gone, bad reply): D prefills locally instead."""


@dataclass
class PullStats:
    """How much one pull moved and how long it took."""

    transport: str
    num_blocks: int
    bytes: int
    seconds: float
    released: bool = False  # P was told to end the lease with the pull's last read: no `release`

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __add__(self, other: PullStats) -> PullStats:
        """Two parts of one pull: the same blocks, other heads (from another P rank)."""
        return PullStats(
            self.transport if self.transport == other.transport else "mixed",
            max(self.num_blocks, other.num_blocks),
            self.bytes + other.bytes,
            self.seconds + other.seconds,
            other.released,  # the later part is the one that may release
        )


MIN_PULL_BYTES_PER_S = 100e6  # slower than this, a pull is stuck, whatever its size


def pull_timeout_s(timeout_s: float, kv_caches: list[torch.Tensor], num_blocks: int) -> float:
    """A pull's whole budget: `timeout_s` plus the time its bytes take at the minimum rate."""
    layer = kv_caches[0]  # every layer has the same shape; a view per layer costs ~5 us
    bytes_per_block = layer[:, 0].numel() * layer.element_size() * len(kv_caches)
    return timeout_s + num_blocks * bytes_per_block / MIN_PULL_BYTES_PER_S


class BlockPuller(Protocol):
    """The D side of one transport (host, tcp, cuda_ipc)."""

    name: str

    def pull(
        self,
        endpoint: dict,
        remote_request_id: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        kv_caches: list[torch.Tensor],
        heads: HeadSlice | None = None,
        release: bool = False,
        *,
        lease_token: str,
    ) -> PullStats:
        """Copy remote blocks into `local_block_ids` of `kv_caches`; TransferError on failure.
        `release`: P ends the lease with the pull's last read (`PullStats.released`: the
        request reached P; False: D must send `release` itself). `lease_token`: the lease's
        capability, from the signed hand-off."""
        ...

    def release(self, endpoint: dict, remote_request_id: str, lease_token: str) -> bool:
        """Tell the source its lease on `remote_request_id` can end."""
        ...

    def close(self) -> None: ...
