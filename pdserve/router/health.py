"""Background health checks: poll every instance's /health, expire lapsed registrations."""

from __future__ import annotations

import asyncio
import logging

import httpx

from pdserve.router.registry import Instance, Registry

log = logging.getLogger(__name__)


async def check(client: httpx.AsyncClient, inst: Instance, timeout_s: float) -> bool:
    """One probe: healthy means /health answered 200 in time."""
    try:
        resp = await client.get(inst.url + "/health", timeout=timeout_s)
        ok = resp.status_code == 200
    except httpx.HTTPError:
        ok = False
    if ok != inst.healthy:
        log.log(logging.INFO if ok else logging.WARNING, "instance %s (%s) is now %s",
                inst.url, inst.role, "healthy" if ok else "unhealthy")
    inst.mark(ok)
    return ok


async def check_all(client: httpx.AsyncClient, registry: Registry, timeout_s: float) -> None:
    await asyncio.gather(*(check(client, i, timeout_s) for i in registry.all()))
    for inst in registry.expire():
        log.warning("dropped registered instance %s (%s): heartbeat or health lapsed",
                    inst.url, inst.role)


async def poll_forever(client: httpx.AsyncClient, registry: Registry,
                       interval_s: float = 1.0, timeout_s: float = 3.0) -> None:
    """Runs for the router's lifetime; instances are checked concurrently."""
    while True:
        await check_all(client, registry, timeout_s)
        await asyncio.sleep(interval_s)
