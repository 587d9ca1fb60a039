"""Calls to instances, with failures sorted into 'try elsewhere' and 'tell the client'.

Every call is signed with the deployment secret (an instance then needs no API key from the
router); the JSON is serialized here, once, so that the MAC covers exactly the bytes sent.
The client is aiohttp's: its HTTP parser is C, where httpx's (httpcore, pure Python) took
~30% of the router's CPU relaying 64 streams (docs/PERF.md, "Serving path").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdserve.router.metrics import RouterMetrics
from pdserve.router.registry import Instance
from pdserve.security import DeploymentSecret, sign_request

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 5.0  # a lease release is best effort: P's TTL frees the blocks anyway
CONNECT_TIMEOUT_S = 5.0  # an answer may take as long as it takes; a connection may not
MAX_LINE_BYTES = 64 << 20  # a stream line longer than this is a broken instance, not an answer
# what a failed call raises: a connection error, or a timeout where one was set
CALL_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def new_session() -> aiohttp.ClientSession:
    """The router's client: unlimited connections (each stream holds one), no proxies from
    the environment (an instance's URL is dialled as registered), and no read timeout (a
    long generation may take minutes; a broken connection still raises)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        auto_decompress=False, trust_env=False)


async def lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The lines of a streamed body, without their line ends; StreamBroken if the stream
    breaks (or sends a line over MAX_LINE_BYTES). Splitting here, not with aiohttp's
    readline, leaves no 128 KiB line limit (an echoed prompt is one line)."""
    pending = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            pending += chunk
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                if end - start > MAX_LINE_BYTES:
                    break
                yield pending[start:end].rstrip(b"\r").decode(errors="replace")
                start = end + 1
            del pending[:start]
            if len(pending) > MAX_LINE_BYTES:
                raise StreamBroken(f"a line over {MAX_LINE_BYTES} bytes")
    except CALL_ERRORS as exc:
        raise StreamBroken(f"{type(exc).__name__}: {exc}") from exc
    if pending:
        yield pending.rstrip(b"\r").decode(errors="replace")


class StreamBroken(Exception):
    """An instance's stream broke after its headers (or ended before [DONE])."""


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
class Answer:
    """A non-streamed answer, read whole."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)  # as httpx did: the stdlib's reader, NaN included


@dataclass
class Stream:
    """A streamed answer whose headers said 2xx: read its lines, then close it."""

    resp: aiohttp.ClientResponse

    def lines(self) -> AsyncIterator[str]:
        return lines(self.resp)

    async def aclose(self) -> None:
        """Keep the connection for the next call if the body was read to its end; else
        close it, so that the instance sees the client leave and stops generating."""
        if self.resp.content.at_eof():
            self.resp.release()
        else:
            self.resp.close()


@dataclass
class Upstream:
    """The router's one HTTP client to all instances."""

    session: aiohttp.ClientSession
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

    def _refusal(self, inst: Instance, status: int, content: bytes) -> Exception:
        """What an answer of 400 or more raises: the client's fault (4xx) or the instance's."""
        if status < 500:
            return Refused(status, content)
        return self._failed(inst, f"HTTP {status}: {content[:300]!r}", False)

    async def _send(self, inst: Instance, path: str, body: dict) -> aiohttp.ClientResponse:
        """POST `body`, signed; a failure to connect or to get the headers is the
        instance's (UpstreamError)."""
        content, headers = self.signed("POST", path, body)
        try:
            return await self.session.post(inst.url + path, data=content, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise self._failed(inst, f"cannot connect ({exc})", True) from exc
        except CALL_ERRORS as exc:
            raise self._failed(inst, f"{type(exc).__name__}: {exc}", False) from exc

    async def _read(self, inst: Instance, resp: aiohttp.ClientResponse) -> Answer:
        """The whole body of `resp`, its connection released; a broken read is the
        instance's failure."""
        try:
            return Answer(resp.status, await resp.read())
        except CALL_ERRORS as exc:
            raise self._failed(inst, f"{type(exc).__name__}: {exc}", False) from exc
        finally:
            resp.release()

    async def post(self, inst: Instance, path: str, body: dict) -> Answer:
        """A non-streamed request; returns a 2xx answer, read whole."""
        answer = await self._read(inst, await self._send(inst, path, body))
        if answer.status_code >= 400:
            raise self._refusal(inst, answer.status_code, answer.content)
        return answer

    async def open_stream(self, inst: Instance, path: str, body: dict) -> Stream:
        """A streamed request whose headers said 2xx; the caller reads and closes it."""
        resp = await self._send(inst, path, body)
        if resp.status < 400:
            return Stream(resp)
        answer = await self._read(inst, resp)
        raise self._refusal(inst, answer.status_code, answer.content)

    async def release_lease(self, inst: Instance, request_id: str, lease_token: str | None,
                            timeout_s: float = RELEASE_TIMEOUT_S) -> bool:
        """Ask prefill instance `inst` to free the KV it holds for `request_id` now. Best
        effort: never raises, and a failure (logged) leaves the lease to expire on P."""
        content, headers = self.signed("POST", "/v1/kv/release",
                                       {"remote_request_id": request_id,
                                        "lease_token": lease_token})
        try:
            async with self.session.post(inst.url + "/v1/kv/release", data=content,
                                         headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)
                                         ) as resp:
                if resp.status == 200:
                    return True
                message = f"HTTP {resp.status}: {(await resp.read())[:300]!r}"
        except Exception as exc:  # any: the router may be closing its client meanwhile
            message = f"{type(exc).__name__}: {exc}"
        log.warning("could not release KV lease %s on %s: %s", request_id, inst.url, message)
        return False

    def broken(self, inst: Instance, exc: Exception) -> None:
        """A stream that broke after its headers: count it and mark the instance."""
        self._failed(inst, f"stream broke: {type(exc).__name__}: {exc}", False)
