"""Background health checks: poll every instance's /health, expire lapsed registrations."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from pdserve.router.registry import Instance, Registry
from pdserve.router.upstream import CALL_ERRORS

log = logging.getLogger(__name__)


async def check(session: aiohttp.ClientSession, inst: Instance, timeout_s: float) -> bool:
    """One probe: healthy means /health answered 200 in time."""
    try:
        async with session.get(inst.url + "/health",
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()  # the connection goes back to the pool
            ok = resp.status == 200
    except CALL_ERRORS:
        ok = False
    if ok != inst.healthy:
        log.log(logging.INFO if ok else logging.WARNING, "instance %s (%s) is now %s",
                inst.url, inst.role, "healthy" if ok else "unhealthy")
    inst.mark(ok)
    return ok


async def check_all(session: aiohttp.ClientSession, registry: Registry,
                    timeout_s: float) -> None:
    await asyncio.gather(*(check(session, i, timeout_s) for i in registry.all()))
    for inst in registry.expire():
        log.warning("dropped registered instance %s (%s): heartbeat or health lapsed",
                    inst.url, inst.role)


async def poll_forever(session: aiohttp.ClientSession, registry: Registry,
                       interval_s: float = 1.0, timeout_s: float = 3.0) -> None:
    """Runs for the router's lifetime; instances are checked concurrently."""
    while True:
        await check_all(session, registry, timeout_s)
        await asyncio.sleep(interval_s)
