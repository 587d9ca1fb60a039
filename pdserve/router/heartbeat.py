"""The instance's side of registration: POST /register to a router every few seconds.

An instance started with a router's address runs `keep_registered` for its lifetime; when
it stops (or dies), the heartbeats stop and the router drops it after its heartbeat TTL.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

log = logging.getLogger(__name__)


async def keep_registered(router_url: str, url: str, role: str, interval_s: float = 2.0,
                          deregister_on_exit: bool = True) -> None:
    """Heartbeat until cancelled; a router that is down is retried, never fatal."""
    body = {"url": url, "role": role}
    async with httpx.AsyncClient(timeout=5.0) as client:
        try:
            while True:
                try:
                    await client.post(router_url.rstrip("/") + "/register", json=body)
                except httpx.HTTPError as exc:
                    log.warning("cannot register with router %s: %s", router_url, exc)
                await asyncio.sleep(interval_s)
        finally:
            if deregister_on_exit:  # leave at once rather than after the TTL
                try:
                    await client.post(router_url.rstrip("/") + "/deregister", json={"url": url})
                except httpx.HTTPError:
                    pass
