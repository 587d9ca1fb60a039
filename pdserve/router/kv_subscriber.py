"""The router's side of the KV event channel: one long-lived, signed GET /v1/kv/events per
instance, applied to the KV index and to the instance's load.

Why a stream and not a poll: an eviction or a new prefix must reach the index within a step,
not a poll period later, and a stream costs nothing while the cache is idle. Why HTTP and
not a socket of its own: the instance already authenticates internal calls by the
deployment secret (pdserve/http_auth.py), and the router already reaches it there. The
instance bounds what it queues per subscriber and resyncs with a snapshot; the router drops
an instance's entries whenever its stream breaks, and starts from the snapshot on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp

from pdserve.router.kv_index import KVIndex
from pdserve.router.registry import Instance, Registry
from pdserve.router.upstream import CALL_ERRORS, StreamBroken, lines
from pdserve.security import DeploymentSecret, sign_request

log = logging.getLogger(__name__)

EVENTS_PATH = "/v1/kv/events"
READ_TIMEOUT_S = 5.0  # the instance sends a load line every 0.5 s: silence means it is gone
RETRY_S = 1.0  # after a broken stream
UNSUPPORTED_RETRY_S = 30.0  # an instance without the endpoint (vLLM; no prefix cache)


def apply(index: KVIndex, inst: Instance, msg: object) -> None:
    """One line of the stream; ValueError if it is malformed (the stream is dropped)."""
    if not isinstance(msg, dict):
        raise ValueError("a KV event must be a JSON object")
    kind = msg.get("type")
    if kind == "snapshot":
        index.reset(inst.url, msg.get("block_size"), msg.get("hashes"))
    elif kind == "stored":
        index.stored(inst.url, msg.get("hashes"))
    elif kind == "removed":
        index.removed(inst.url, msg.get("hashes"))
    elif kind == "load":
        waiting, running, usage = msg.get("waiting"), msg.get("running"), msg.get("kv_usage")
        if not (type(waiting) is int and type(running) is int
                and isinstance(usage, (int, float)) and 0 <= usage <= 1):
            raise ValueError("a load line needs int waiting, running and kv_usage in [0, 1]")
        inst.waiting, inst.running, inst.kv_usage = waiting, running, float(usage)
    else:
        raise ValueError(f"unknown KV event type {kind!r}")


async def follow(session: aiohttp.ClientSession, inst: Instance, index: KVIndex,
                 secret: DeploymentSecret | None) -> None:
    """Keep `inst`'s entries in `index` current until cancelled."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=READ_TIMEOUT_S)
    while True:
        wait = RETRY_S
        headers = sign_request(secret, "GET", EVENTS_PATH) if secret is not None else {}
        try:
            async with session.get(inst.url + EVENTS_PATH, headers=headers,
                                   timeout=timeout) as resp:
                if resp.status != 200:
                    log.info("instance %s publishes no KV events (%d)", inst.url, resp.status)
                    wait = UNSUPPORTED_RETRY_S
                else:
                    async for line in lines(resp):
                        if line:
                            apply(index, inst, json.loads(line))
        except (*CALL_ERRORS, StreamBroken, ValueError) as exc:
            log.debug("KV events of %s: %s", inst.url, exc)
        # not on cancellation: whoever cancels drops it (a newer stream may own it by then)
        index.drop(inst.url)
        await asyncio.sleep(wait)


class Subscriptions:
    """One `follow` task per known instance, started and stopped as the registry changes."""

    def __init__(self, session: aiohttp.ClientSession, registry: Registry, index: KVIndex,
                 secret: DeploymentSecret | None) -> None:
        self.session, self.registry, self.index, self.secret = session, registry, index, secret
        self._tasks: dict[str, tuple[Instance, asyncio.Task]] = {}

    def sync(self) -> None:
        """Follow every instance in the registry, and no other (one that registered again
        is a new Instance: its stream starts over)."""
        known = {inst.url: inst for inst in self.registry.engines()}  # encoders keep no KV
        for url, (inst, task) in list(self._tasks.items()):
            if known.get(url) is not inst:
                del self._tasks[url]
                task.cancel()
                self.index.drop(url)
        for url, inst in known.items():
            if url not in self._tasks:
                task = asyncio.create_task(follow(self.session, inst, self.index, self.secret))
                self._tasks[url] = (inst, task)

    async def run(self, interval_s: float) -> None:
        """Sync every `interval_s` until cancelled; then stop every stream."""
        try:
            while True:
                self.sync()
                await asyncio.sleep(interval_s)
        finally:
            tasks = [task for _, task in self._tasks.values()]
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

