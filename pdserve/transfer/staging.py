"""P side of the host transport when P's caches are not in shared memory (GPU caches).

P keeps one staging buffer in /dev/shm (page-locked with cudaHostRegister when the caches
are on a GPU, so device-to-host copies run at full PCIe speed). For each chunk of layers
D asks for (`stage`), P gathers the requested blocks into it and answers where each layer
landed; D copies from its mapping of the buffer into its own caches. One reader owns the
buffer at a time (from its first `stage` to its `end` or disconnect).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import torch

from pdserve.transfer.blockcopy import Scratch, gather_blocks
from pdserve.transfer.host import allocate_shared_bytes, shared_kv_path, unlink_shared_kv_caches

log = logging.getLogger(__name__)


@dataclass
class StagingBuffer:
    """A shared-memory buffer P gathers blocks into for one reader at a time."""

    name: str
    nbytes: int
    device: torch.device  # where P's caches live

    def __post_init__(self) -> None:
        self.buffer = allocate_shared_bytes(self.nbytes, self.name)
        self._lock = threading.Lock()
        self._pinned = False
        if self.device.type == "cuda":
            self._pin()

    def describe(self) -> dict:
        """What D maps: the file and its size."""
        return {"staging": {"path": shared_kv_path(self.name), "size": self.nbytes}}

    def acquire(self, timeout_s: float) -> bool:
        return self._lock.acquire(timeout=timeout_s)

    def release(self) -> None:
        self._lock.release()

    def stage(
        self,
        kv_caches: list[torch.Tensor],
        layers: range,
        block_ids: torch.Tensor,
        heads: tuple[int, int],
        scratch: Scratch,
    ) -> list[dict]:
        """Gather blocks of `layers` back to back into the buffer; each layer's offset and shape.

        The caller holds the buffer (acquire) and has checked the lease.
        """
        out, offset = [], 0
        for i in layers:
            src = kv_caches[i][:, :, :, heads[0] : heads[1]]
            shape = (2, len(block_ids), *src.shape[2:])
            nbytes = torch.Size(shape).numel() * src.element_size()
            if offset + nbytes > self.nbytes:
                raise ValueError(
                    f"layers {layers} do not fit the {self.nbytes}-byte staging buffer"
                )
            dst = self.buffer[offset : offset + nbytes].view(src.dtype).view(shape)
            if src.device.type == "cpu":
                torch.index_select(src, 1, block_ids, out=dst)  # straight into shared memory
            else:
                dst.copy_(gather_blocks(src, block_ids, None, scratch), non_blocking=self._pinned)
            out.append({"layer": i, "offset": offset, "shape": list(shape)})
            offset += nbytes
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # bytes in place before D reads
        return out

    def close(self) -> None:
        """Unpin and unlink the file."""
        if self._pinned:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self._pinned = False
        unlink_shared_kv_caches(self.name)

    def _pin(self) -> None:
        try:
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.nbytes, 0)
            self._pinned = int(err) == 0
        except Exception as e:  # pageable staging still works, only slower
            log.warning("could not pin the KV staging buffer: %s", e)
