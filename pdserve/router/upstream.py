"""Calls to instances, with failures sorted into 'try elsewhere' and 'tell the client'.

Every call is signed with the deployment secret (an instance then needs no API key from the
router); the JSON is serialized here, once, so that the MAC covers exactly the bytes sent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import httpx

from pdserve.router.metrics import RouterMetrics
from pdserve.router.registry import Instance
from pdserve.security import DeploymentSecret, sign_request

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 5.0  # a lease release is best effort: P's TTL frees the blocks anyway


class UpstreamError(Exception):
    """The instance could not answer (connection error or 5xx): another one may."""

    def __init__(self, inst: Instance, message: str, connect: bool) -> None:
        # what a client may read: no URL, no detail (the log has both)
        super().__init__(f"the {inst.role} instance failed")
        self.inst = inst
        self.connect = connect  # the request never reached it: safe to send elsewhere


class Refused(Exception):
    """The instance answered 4xx: the client's request is at fault; pass it through."""

    def __init__(self, status_code: int, content: bytes) -> None:
        super().__init__(f"refused with {status_code}")
        self.status_code = status_code
        self.content = content


@dataclass
class Upstream:
    """The router's one HTTP client to all instances."""

    client: httpx.AsyncClient
    metrics: RouterMetrics
    secret: DeploymentSecret | None = None  # None: calls go unsigned (instances must be open)

    def signed(self, method: str, path: str, body: dict | None = None
               ) -> tuple[bytes, dict[str, str]]:
        """The bytes of `body` and the headers that authenticate this call to an instance."""
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        if self.secret is not None:
            headers.update(sign_request(self.secret, method, path, content))
        return content, headers

    def _failed(self, inst: Instance, message: str, connect: bool) -> UpstreamError:
        inst.mark(False)  # until the next health check says otherwise
        self.metrics.upstream_errors.labels(inst.role).inc()
        log.warning("%s instance %s failed: %s", inst.role, inst.url, message)
        return UpstreamError(inst, message, connect)

    async def _check(self, inst: Instance, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        content = await resp.aread()
        if resp.status_code < 500:
            raise Refused(resp.status_code, content)
        raise self._failed(inst, f"HTTP {resp.status_code}: {content[:300]!r}", False)

    async def post(self, inst: Instance, path: str, body: dict) -> httpx.Response:
        """A non-streamed request; returns a 2xx response with its body read."""
        content, headers = self.signed("POST", path, body)
        try:
            resp = await self.client.post(inst.url + path, content=content, headers=headers)
        except httpx.ConnectError as exc:
            raise self._failed(inst, f"cannot connect ({exc})", True) from exc
        except httpx.TransportError as exc:
            raise self._failed(inst, f"{type(exc).__name__}: {exc}", False) from exc
        await self._check(inst, resp)
        return resp

    async def open_stream(self, inst: Instance, path: str, body: dict) -> httpx.Response:
        """A streamed request whose headers said 2xx; the caller reads and closes it."""
        content, headers = self.signed("POST", path, body)
        request = self.client.build_request("POST", inst.url + path, content=content,
                                            headers=headers)
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise self._failed(inst, f"cannot connect ({exc})", True) from exc
        except httpx.TransportError as exc:
            raise self._failed(inst, f"{type(exc).__name__}: {exc}", False) from exc
        try:
            await self._check(inst, resp)
        except BaseException:
            await resp.aclose()
            raise
        return resp

    async def release_lease(self, inst: Instance, request_id: str, lease_token: str | None,
                            timeout_s: float = RELEASE_TIMEOUT_S) -> bool:
        """Ask prefill instance `inst` to free the KV it holds for `request_id` now. Best
        effort: never raises, and a failure (logged) leaves the lease to expire on P."""
        content, headers = self.signed("POST", "/v1/kv/release",
                                       {"remote_request_id": request_id,
                                        "lease_token": lease_token})
        try:
            resp = await self.client.post(inst.url + "/v1/kv/release", timeout=timeout_s,
                                          content=content, headers=headers)
            if resp.status_code == 200:
                return True
            message = f"HTTP {resp.status_code}: {resp.content[:300]!r}"
        except Exception as exc:  # any: the router may be closing its client meanwhile
            message = f"{type(exc).__name__}: {exc}"
        log.warning("could not release KV lease %s on %s: %s", request_id, inst.url, message)
        return False

    def broken(self, inst: Instance, exc: Exception) -> None:
        """A stream that broke after its headers: count it and mark the instance."""
        self._failed(inst, f"stream broke: {type(exc).__name__}: {exc}", False)
