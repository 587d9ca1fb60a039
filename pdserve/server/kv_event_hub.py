"""The instance's side of the KV event channel: the set of block hashes its prefix cache
holds, and a stream of its changes for each subscribed router.

A router opens GET /v1/kv/events (an internal call, signed with the deployment secret) and
reads newline-delimited JSON: first a snapshot of every cached hash, then the changes as
the engine steps ("removed" before "stored"), and a "load" line at least every
LOAD_INTERVAL_S that doubles as a keepalive. A subscriber that falls more than MAX_PENDING
batches behind loses its backlog and gets a fresh snapshot instead; a router that
reconnects starts from a snapshot too. So nothing grows without bound, and a router's
index is exact again after any gap.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable

from pdserve.engine.kv_events import KVEvents

MAX_PENDING = 512  # batches queued for one subscriber before it is resynced by a snapshot
LOAD_INTERVAL_S = 0.5  # load lines (and keepalives) at least this often


class Subscriber:
    """One router's queue of batches, bounded; `resync` means: send a snapshot next."""

    def __init__(self, max_pending: int) -> None:
        self.pending: deque[KVEvents] = deque()
        self.max_pending = max_pending
        self.resync = True  # the first thing a subscriber gets is the snapshot
        self.wakeup = asyncio.Event()

    def push(self, events: KVEvents) -> None:
        if self.resync:
            return  # the snapshot to come includes it
        if len(self.pending) >= self.max_pending:
            self.pending.clear()
            self.resync = True
        else:
            self.pending.append(events)
        self.wakeup.set()


class KVEventHub:
    """The cached hashes, kept from the engine's events; fans the events out to subscribers.
    Used on the event loop only (the engine's messages are read there)."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.block_size = 0  # 0: the engine publishes nothing (no prefix cache)
        self.cached: set[int] = set()
        self.max_pending = max_pending
        self._subscribers: set[Subscriber] = set()

    def publish(self, events: KVEvents) -> None:
        self.cached.difference_update(events.removed)
        self.cached.update(events.stored)
        for sub in self._subscribers:
            sub.push(events)

    def snapshot(self) -> dict:
        return {"type": "snapshot", "block_size": self.block_size,
                "hashes": sorted(self.cached)}

    async def stream(self, load: Callable[[], dict]) -> AsyncIterator[bytes]:
        """One subscriber's lines until it leaves (the response is cancelled)."""
        sub = Subscriber(self.max_pending)
        self._subscribers.add(sub)
        try:
            while True:
                if sub.resync:
                    sub.resync = False
                    yield _line(self.snapshot())
                while sub.pending and not sub.resync:
                    events = sub.pending.popleft()
                    if events.removed:
                        yield _line({"type": "removed", "hashes": events.removed})
                    if events.stored:
                        yield _line({"type": "stored", "hashes": events.stored})
                yield _line({"type": "load", **load()})
                sub.wakeup.clear()
                try:
                    await asyncio.wait_for(sub.wakeup.wait(), LOAD_INTERVAL_S)
                except TimeoutError:
                    pass
        finally:
            self._subscribers.discard(sub)


def _line(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"
