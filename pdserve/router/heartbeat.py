"""The instance's side of registration: POST /register to a router every few seconds.

An instance started with a router's address runs `keep_registered` for its lifetime; when
it stops (or dies), the heartbeats stop and the router drops it after its heartbeat TTL.
Each call is signed with the deployment secret: a router takes registrations from nobody else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import httpx

from pdserve.router.registry import normalize_url
from pdserve.security import SECRET_ENV, DeploymentSecret, sign_request

log = logging.getLogger(__name__)


async def keep_registered(router_url: str, url: str, role: str,
                          secret: DeploymentSecret | None, interval_s: float = 2.0,
                          deregister_on_exit: bool = True) -> None:
    """Heartbeat until cancelled, at least three times per the router's TTL; a router that
    is down is retried, never fatal. Without a secret it does not register at all."""
    if secret is None:
        log.error("not registering with router %s: this instance has no deployment secret; "
                  "set $%s (the router's) or pass --secret-file", router_url, SECRET_ENV)
        return
    body, base = {"url": url, "role": role}, normalize_url(router_url)

    async def post(path: str, data: dict) -> httpx.Response:
        content = json.dumps(data).encode()
        return await client.post(base + path, content=content, headers={
            "content-type": "application/json", **sign_request(secret, "POST", path, content)})

    async with httpx.AsyncClient(timeout=5.0) as client:
        try:
            while True:
                wait = interval_s
                try:
                    resp = await post("/register", body)
                    if resp.status_code != 200:
                        log.warning("router %s refused registration: %s", base, resp.text)
                    wait = min(interval_s, _router_ttl(resp) / 3)
                except httpx.HTTPError as exc:
                    log.warning("cannot register with router %s: %s", base, exc)
                await asyncio.sleep(wait)
        finally:
            if deregister_on_exit:  # leave at once rather than after the TTL
                try:
                    await post("/deregister", {"url": url})
                except httpx.HTTPError:
                    pass


def _router_ttl(resp: httpx.Response) -> float:
    """The heartbeat TTL the router announced (a short one needs faster heartbeats)."""
    try:
        return float(resp.json()["heartbeat_ttl_s"]) or math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf
