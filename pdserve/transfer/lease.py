"""Leases: a prefill engine keeps a finished request's KV blocks alive until D has pulled them.

The engine owns the blocks. It `hold`s them when P finishes a request, and frees whatever
`release` or `expire` hands back. Transport threads only touch the table: `begin_read`
admits a read covered by a live lease and pins it, `end_read` unpins it, and `release_later`
ends a lease on D's (or the router's) word, its blocks going back to the owner at its next
`expire` (so the engine frees blocks only on its own thread).

Every lease has a `token`, an unguessable capability made when it is held: a read
(`begin_read`) or a release (`release`, `release_later`) must offer it; the request id
alone grants nothing (it is the client's own response id). Only the owner (the engine)
ends a lease without it (`revoke`).

The table's one rule for reads: a pinned lease's blocks are never handed back. A lease that
ends while read (released, or past its TTL) refuses new reads at once, but its blocks come
out of `expire` only once its last admitted read has ended. So a read, once admitted, saw
P's data whatever happened meanwhile, and D need not ask afterwards.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pdserve.security import capability_matches, new_capability


@dataclass
class KVLease:
    """One request's blocks, kept alive on P until `expires_at` (time.monotonic seconds)."""

    request_id: str
    block_ids: list[int]
    expires_at: float
    lease_id: int  # unique per hold, so a read can tell a re-held request id from its own lease
    token: str = field(default_factory=new_capability, repr=False)  # reads and releases need it
    readers: int = 0  # admitted reads not yet ended: while > 0 the blocks stay put
    ended: bool = False  # released or expired while read: the last `end_read` frees it


class LeaseTable:
    """Thread-safe table of leases, keyed by request id (live ones) and lease id (read ones)."""

    def __init__(self, default_ttl_s: float = 30.0) -> None:
        self.default_ttl_s = default_ttl_s
        self._leases: dict[str, KVLease] = {}  # live: new reads are admitted
        self._read: dict[int, KVLease] = {}  # pinned by a read, live or ended
        self._freed: list[int] = []  # blocks of ended, unpinned leases, for the owner's `expire`
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def hold(
        self,
        request_id: str,
        block_ids: list[int],
        ttl_s: float | None = None,
        now: float | None = None,
        token: str | None = None,
    ) -> KVLease:
        """Keep `block_ids` alive for `request_id` for `ttl_s` seconds, readable and releasable
        with `token` (a new capability if None: the lease's `token`)."""
        now = time.monotonic() if now is None else now
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        with self._lock:
            if request_id in self._leases:
                # a second hold would silently drop the first lease's blocks
                raise ValueError(f"request {request_id!r} already holds a lease")
            lease = KVLease(request_id, list(block_ids), now + ttl, next(self._ids),
                            token or new_capability())
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

    def release(self, request_id: str, token: object) -> list[int] | Literal[False]:
        """End the lease and return its block ids for the caller to free; False if none, or
        `token` is not its capability. A lease being read returns [] instead: its blocks come
        out of `expire` once read."""
        with self._lock:
            if self._live(request_id, token) is None:
                return False
            lease = self._end(request_id)
            if lease is None:
                return False
            return [] if lease.readers else lease.block_ids

    def release_later(self, request_id: str, token: object, lease_id: int | None = None
                      ) -> bool:
        """End the lease now (new reads are refused); its blocks come out of the next `expire`
        after its last read ends. With `lease_id`, only that lease (not a later hold of the
        same request id). False if there is no such live lease, or `token` is not its
        capability."""
        with self._lock:
            lease = self._live(request_id, token)
            if lease is None or lease_id not in (None, lease.lease_id):
                return False
            self._end_later(lease)
            return True

    def revoke(self, request_id: str) -> bool:
        """The owner's `release_later`, without the capability: the engine ends a lease of
        its own (its client left before reading the hand-off). False if none is live."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return False
            self._end_later(lease)
            return True

    def expire(self, now: float | None = None) -> list[int]:
        """Block ids the owner must free now: leases past their TTL, and those ended by
        `release_later`, except the ones still read (they come out once their reads end)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
            blocks, self._freed = self._freed, []
            for rid in dead:
                lease = self._end(rid)
                if lease is not None and not lease.readers:
                    blocks.extend(lease.block_ids)
            return blocks

    def begin_read(self, request_id: str, block_ids: list[int], token: object,
                   now: float | None = None) -> int | None:
        """Admit and pin a read of `block_ids`: the lease id if a live lease covers them and
        `token` is its capability, else None. Every admitted read must be ended by exactly one
        `end_read`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            lease = self._live(request_id, token)
            if lease is None or lease.expires_at <= now:
                return None
            if not set(block_ids) <= set(lease.block_ids):
                return None
            lease.readers += 1
            self._read[lease.lease_id] = lease
            return lease.lease_id

    def end_read(self, lease_id: int) -> bool:
        """Unpin one admitted read of lease `lease_id`; an ended lease's blocks go to the
        owner with its last read. True if such a read was open (its data stayed valid)."""
        with self._lock:
            lease = self._read.get(lease_id)
            if lease is None:
                return False
            lease.readers -= 1
            if lease.readers == 0:
                del self._read[lease_id]
                if lease.ended:
                    self._freed.extend(lease.block_ids)
            return True

    def is_live(self, request_id: str, lease_id: int, token: object,
                now: float | None = None) -> bool:
        """Whether lease `lease_id` of `request_id` is still held (a read's data stayed valid);
        only its capability's holder may ask."""
        now = time.monotonic() if now is None else now
        with self._lock:
            lease = self._live(request_id, token)
            return lease is not None and lease.lease_id == lease_id and lease.expires_at > now

    def covers(self, lease_id: int, block_ids: list[int]) -> bool:
        """Whether lease `lease_id` is pinned by a read and holds `block_ids`."""
        with self._lock:
            lease = self._read.get(lease_id)
            return lease is not None and set(block_ids) <= set(lease.block_ids)

    def _live(self, request_id: str, token: object) -> KVLease | None:
        """The live lease of `request_id` if `token` is its capability (lock held)."""
        lease = self._leases.get(request_id)
        if lease is None or not capability_matches(lease.token, token):
            return None
        return lease

    def _end_later(self, lease: KVLease) -> None:
        """End a live lease; its blocks go to `expire` now, or with its last read (lock held)."""
        self._end(lease.request_id)
        if not lease.readers:
            self._freed.extend(lease.block_ids)

    def _end(self, request_id: str) -> KVLease | None:
        """Take the lease out of the live table (lock held); a read one waits for `end_read`."""
        lease = self._leases.pop(request_id, None)
        if lease is not None:
            lease.ended = True
        return lease

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._leases
