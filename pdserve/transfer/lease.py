"""Leases: a prefill engine keeps a finished request's KV blocks alive until D has pulled them.

The engine owns the blocks. It `hold`s them when P finishes a request, and frees whatever
`release` or `expire` hands back. Transport threads only read the table: `begin_read` checks
a read is covered by a live lease, `is_live` checks it still was when the read ended, and
`release_later` ends a lease on D's word, its blocks going back to the owner at its next
`expire` (so the engine frees blocks only on its own thread).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Literal


@dataclass
class KVLease:
    """One request's blocks, kept alive on P until `expires_at` (time.monotonic seconds)."""

    request_id: str
    block_ids: list[int]
    expires_at: float
    lease_id: int  # unique per hold, so a read can tell a re-held request id from its own lease


class LeaseTable:
    """Thread-safe table of live leases, keyed by request id."""

    def __init__(self, default_ttl_s: float = 30.0) -> None:
        self.default_ttl_s = default_ttl_s
        self._leases: dict[str, KVLease] = {}
        self._ended: list[int] = []  # blocks of leases ended by release_later, for the owner
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def hold(
        self,
        request_id: str,
        block_ids: list[int],
        ttl_s: float | None = None,
        now: float | None = None,
    ) -> KVLease:
        """Keep `block_ids` alive for `request_id` for `ttl_s` seconds."""
        now = time.monotonic() if now is None else now
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        with self._lock:
            if request_id in self._leases:
                # a second hold would silently drop the first lease's blocks
                raise ValueError(f"request {request_id!r} already holds a lease")
            lease = KVLease(request_id, list(block_ids), now + ttl, next(self._ids))
            self._leases[request_id] = lease
            return lease

    def renew(self, request_id: str, ttl_s: float | None = None, now: float | None = None) -> bool:
        """Push the lease's expiry to now + ttl; False if there is no live lease."""
        now = time.monotonic() if now is None else now
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.expires_at <= now:
                return False
            lease.expires_at = max(lease.expires_at, now + ttl)
            return True

    def release(self, request_id: str) -> list[int] | Literal[False]:
        """End the lease and return its block ids for the caller to free; False if none."""
        with self._lock:
            lease = self._leases.pop(request_id, None)
            return False if lease is None else lease.block_ids

    def release_later(self, request_id: str) -> bool:
        """End the lease now (reads are refused); its blocks come out of the next `expire`."""
        with self._lock:
            lease = self._leases.pop(request_id, None)
            if lease is None:
                return False
            self._ended.extend(lease.block_ids)
            return True

    def expire(self, now: float | None = None) -> list[int]:
        """Block ids the owner must free now: expired leases plus those ended by release_later."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
            blocks, self._ended = self._ended, []
            for rid in dead:
                blocks.extend(self._leases.pop(rid).block_ids)
            return blocks

    def begin_read(
        self,
        request_id: str,
        block_ids: list[int],
        read_timeout_s: float,
        now: float | None = None,
    ) -> int | None:
        """Admit a read of `block_ids`: the lease id if a live lease covers them, else None.

        The lease is extended to outlive the read, so it cannot expire under a reader.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.expires_at <= now:
                return None
            if not set(block_ids) <= set(lease.block_ids):
                return None
            lease.expires_at = max(lease.expires_at, now + read_timeout_s)
            return lease.lease_id

    def is_live(self, request_id: str, lease_id: int, now: float | None = None) -> bool:
        """Whether lease `lease_id` of `request_id` is still held (a read's data stayed valid)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            lease = self._leases.get(request_id)
            return lease is not None and lease.lease_id == lease_id and lease.expires_at > now

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._leases
