"""The E step of E->P->D (and E->colocated): a chat request's images spread over the
healthy encoder instances, one image a call, and their handles passed to P in the internal
field `encoder_handles` (the router signs every call; P refuses the field unsigned).

An image whose encoder fails or refuses it gets a null handle: P encodes that one itself
(and a bad image gets its 400 from P, which decodes every image anyway). With no healthy
encoder the request goes on unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

from pdserve.router.metrics import RouterMetrics
from pdserve.router.registry import ENCODER, Instance, Registry
from pdserve.router.upstream import Refused, Upstream, UpstreamError

log = logging.getLogger(__name__)

ENCODE_PATH = "/v1/encode"
HANDLES = "encoder_handles"
MAX_TRIES = 2  # per image: a second encoder if the first could not be reached
# an encoder slower than this for one image: P encodes it rather than wait on (the router's
# client has no read timeout, for long generations)
ENCODE_TIMEOUT_S = 60.0


def image_parts(body: dict) -> list[dict]:
    """The `image_url` objects of a (validated) chat body, in prompt order: messages in
    order, each one's parts in order, as P numbers them."""
    return [part["image_url"] for message in body.get("messages", [])
            if isinstance(message.get("content"), list)
            for part in message["content"] if part.get("type") == "image_url"]


@dataclass
class Encoders:
    """Picks encoders (least images in flight, ties in turn) and collects handles."""

    registry: Registry
    upstream: Upstream
    metrics: RouterMetrics
    _turn: itertools.count = field(default_factory=itertools.count)

    async def attach(self, body: dict) -> dict:
        """`body` with one handle (or null) per image part, or unchanged: no image, or no
        healthy encoder, or none of the images encoded."""
        parts = image_parts(body)
        if not parts or not self.registry.healthy(ENCODER):
            return body
        handles = await asyncio.gather(*(self._encode(part) for part in parts))
        if all(h is None for h in handles):
            return body
        return {**body, HANDLES: handles}

    async def _encode(self, part: dict) -> dict | None:
        tried: set[str] = set()
        for _ in range(MAX_TRIES):
            inst = self._pick(tried)
            if inst is None:
                break
            tried.add(inst.url)
            inst.in_flight += 1
            try:
                handle = await self._call(inst, part)
                self.metrics.images_encoded.labels("encoder").inc()
                return handle
            except UpstreamError as exc:
                if not exc.connect:  # it had the image: P encodes it rather than wait again
                    break
            except Refused:  # a bad image: P decodes it too and answers the 400
                self.metrics.images_encoded.labels("refused").inc()
                return None
            except TimeoutError:
                log.warning("encoder %s took over %.0f s for an image", inst.url,
                            ENCODE_TIMEOUT_S)
                break
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                log.warning("encoder %s answered garbage: %s", inst.url, exc)
                break
            finally:
                inst.in_flight -= 1
        self.metrics.images_encoded.labels("failed").inc()
        return None

    async def _call(self, inst: Instance, part: dict) -> dict:
        """One image to `inst`; its handle (as E wrote it: P checks every field)."""
        body = {"images": [{"url": part.get("url"), "detail": part.get("detail", "auto")}]}
        resp = await asyncio.wait_for(self.upstream.post(inst, ENCODE_PATH, body),
                                      ENCODE_TIMEOUT_S)
        return resp.json()["handles"][0]

    def _pick(self, tried: set[str]) -> Instance | None:
        candidates = [i for i in self.registry.healthy(ENCODER) if i.url not in tried]
        if not candidates:
            return None
        turn = next(self._turn)
        return min(candidates, key=lambda i: (i.in_flight,
                                              (candidates.index(i) - turn) % len(candidates)))
