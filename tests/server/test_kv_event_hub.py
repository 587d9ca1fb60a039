"""The instance's KV event fan-out: a snapshot first, then the changes; a subscriber that
falls behind is resynced by a snapshot instead of queueing without bound."""

from __future__ import annotations

import asyncio
import json

from pdserve.engine.kv_events import KVEvents
from pdserve.server.kv_event_hub import KVEventHub


def lines_until(hub: KVEventHub, act, count: int) -> list[dict]:
    """The first `count` lines one subscriber reads; `act(hub)` runs after the first."""

    async def run() -> list[dict]:
        stream = hub.stream(lambda: {"waiting": 0, "running": 0, "kv_usage": 0.0})
        got = [json.loads(await anext(stream))]
        act(hub)
        while len(got) < count:
            got.append(json.loads(await anext(stream)))
        await stream.aclose()
        return got

    return asyncio.run(run())


def test_a_subscriber_gets_the_snapshot_then_the_changes():
    hub = KVEventHub()
    hub.block_size = 16
    hub.publish(KVEvents(stored=[1, 2]))
    lines = lines_until(hub, lambda h: h.publish(KVEvents(removed=[1], stored=[3])), 4)
    assert lines[0] == {"type": "snapshot", "block_size": 16, "hashes": [1, 2]}
    kinds = [line["type"] for line in lines[1:]]
    assert kinds == ["removed", "stored", "load"]
    assert (lines[1]["hashes"], lines[2]["hashes"]) == ([1], [3])
    assert hub.cached == {2, 3}


def test_a_subscriber_that_falls_behind_gets_a_fresh_snapshot():
    hub = KVEventHub(max_pending=2)
    hub.block_size = 16

    def flood(h: KVEventHub) -> None:
        for i in range(10, 15):  # more batches than it may queue
            h.publish(KVEvents(stored=[i]))

    lines = lines_until(hub, flood, 3)
    assert [line["type"] for line in lines] == ["snapshot", "load", "snapshot"]  # no stored
    assert lines[2] == {"type": "snapshot", "block_size": 16, "hashes": [10, 11, 12, 13, 14]}
