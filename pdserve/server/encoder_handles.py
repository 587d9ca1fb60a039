"""P's side of encoder disaggregation: the router's `encoder_handles` (one per image part,
in prompt order, or null) checked, and each image's rows pulled from its encoder into
`ImageInput.embeddings` before the request reaches the engine.

Only the deployment sends handles: a call without a valid internal MAC gets a 400, as for
`kv_transfer_params`. A handle must be for this very image (the content hash P computed
from its own decoding of it) with the shape P's model needs; a pull that fails, or a
handle for another image or shape, leaves the image to the engine, which encodes it here:
counted in /metrics (`pdserve:image_embeddings{source="fallback"}`), never a failed
request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from pdserve.media.image_inputs import PreparedImage
from pdserve.server.errors import bad_request
from pdserve.server.metrics import ENGINE, ServerMetrics
from pdserve.transfer.embedding_params import RemoteEmbedding
from pdserve.transfer.embedding_puller import EmbeddingPuller
from pdserve.transfer.protocol import TransferError

log = logging.getLogger(__name__)

PARAM = "encoder_handles"


def parse_handles(handles: list, images: list[PreparedImage] | None, internal: bool
                  ) -> list[RemoteEmbedding | None]:
    """The typed handles, one per image; a 400 naming the field if the caller may not send
    them or they are malformed."""
    if not internal:
        raise bad_request(f"{PARAM} is an internal field: only the router may send it", PARAM)
    count = len(images or [])
    if len(handles) != count:
        raise bad_request(f"{PARAM} must have one entry per image part ({count}), not "
                          f"{len(handles)}", PARAM)
    try:
        return [None if h is None else RemoteEmbedding.from_dict(h, f"{PARAM}[{i}]")
                for i, h in enumerate(handles)]
    except ValueError as e:
        raise bad_request(str(e), PARAM) from None


async def pull_embeddings(puller: EmbeddingPuller, images: list[PreparedImage],
                          handles: list[RemoteEmbedding | None], hidden_size: int,
                          metrics: ServerMetrics) -> list[PreparedImage]:
    """`images` with the rows of each handle's image in `input.embeddings` (pulled at once,
    off the event loop); an image whose pull fails keeps its pixels only."""
    pulls = [_pull(puller, img, h, hidden_size) if h is not None else _nothing()
             for img, h in zip(images, handles, strict=True)]
    out = []
    for img, handle, rows in zip(images, handles, await asyncio.gather(*pulls), strict=True):
        if handle is None:
            metrics.image_embeddings.labels(metrics.model, ENGINE, "local").inc()
        elif rows is None:
            metrics.image_embeddings.labels(metrics.model, ENGINE, "fallback").inc()
        else:
            metrics.image_embeddings.labels(metrics.model, ENGINE, "encoder").inc()
            img = dataclasses.replace(img, input=dataclasses.replace(img.input,
                                                                     embeddings=rows))
        out.append(img)
    return out


def count_local(metrics: ServerMetrics, num_images: int) -> None:
    """Images of a request that came with no handles: the engine encodes them here."""
    if num_images:
        metrics.image_embeddings.labels(metrics.model, ENGINE, "local").inc(num_images)


async def _nothing() -> None:
    return None


async def _pull(puller: EmbeddingPuller, image: PreparedImage, handle: RemoteEmbedding,
                hidden_size: int):
    if handle.content_hash != image.input.content_hash.hex():
        log.warning("an encoder handle is for another image than P decoded (other "
                    "preprocessing settings?): encoding it here")
        await asyncio.to_thread(puller.release, handle)
        return None
    try:
        rows = await asyncio.to_thread(puller.pull, handle, image.input.num_tokens, hidden_size)
    except TransferError as e:
        log.warning("pulling an image's embeddings from %s:%s failed (%s): encoding it here",
                    handle.endpoint["host"], handle.endpoint["port"], e)
        return None
    return rows.share_memory_()  # crosses to the engine process as a handle
