"""An encoder instance's HTTP side: `POST /v1/encode` (internal: the router's signed calls
only) takes images, and answers one handle per image, under which P pulls its rows from
the instance's EmbeddingSource. `/health` and `/metrics` as every instance has them.

Each image is decoded and preprocessed as P would (the same code and settings: the same
content hash and token count, which P checks), looked up in the cache by content hash,
else encoded in the next batch, and its rows held under a lease until P reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve import http_limits
from pdserve.encoder.batcher import EncodeBatcher
from pdserve.encoder.cache import EmbeddingCache
from pdserve.encoder.tower import EncoderModel
from pdserve.http_auth import AuthMiddleware, HTTPAuth
from pdserve.media.errors import MediaError
from pdserve.media.image_inputs import ImagePreparer, ImageRef, PreparedImage
from pdserve.media.limits import MediaLimits
from pdserve.media.vision_spec import vision_spec_of
from pdserve.security import DeploymentSecret
from pdserve.server.errors import (
    APIError,
    bad_request,
    install_error_handlers,
    validation_error,
)
from pdserve.server.protocol import MAX_IMAGE_URL_CHARS
from pdserve.transfer.embedding_params import RemoteEmbedding
from pdserve.transfer.embedding_source import EmbeddingSource, EmbeddingStore

ENCODER_INTERNAL_PATHS = frozenset({"/v1/encode"})
MAX_ENCODE_IMAGES = 64  # per call; the router sends one


class EncodeImage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS)
    detail: Literal["auto", "low", "high"] = "auto"


class EncodeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    images: list[EncodeImage] = Field(min_length=1, max_length=MAX_ENCODE_IMAGES)


@dataclass
class EncoderSettings:
    """What `pdserve serve --role encoder` configures."""

    batch_window_s: float = 0.002
    cache_bytes: int = 1 << 30
    lease_ttl_s: float = 30.0
    max_held_bytes: int = 2 << 30  # rows waiting for P: past this, /v1/encode answers 503
    bind_host: str = "127.0.0.1"  # of the EmbeddingSource
    advertise_host: str | None = None


@dataclass
class EncoderState:
    model: EncoderModel
    preparer: ImagePreparer
    batcher: EncodeBatcher
    cache: EmbeddingCache
    store: EmbeddingStore
    source: EmbeddingSource
    requests: int = 0
    refused: int = 0  # 503s: the store was full
    # images being encoded, by content hash: the same image twice at once is encoded once
    encoding: dict[bytes, asyncio.Future] = field(default_factory=dict)

    def close(self) -> None:
        self.source.close()
        self.batcher.close()
        self.preparer.close()


def build_encoder_app(load: Callable[[], EncoderModel], model_name: str | None,
                      settings: EncoderSettings, secret: DeploymentSecret | None,
                      limits: MediaLimits, heartbeat: Callable[[], Awaitable[None]] | None = None,
                      api_key: str | None = None, open_metrics: bool = False) -> FastAPI:
    """The app; its lifespan loads the tower (`load`), starts the batcher and the
    EmbeddingSource, and heartbeats to a router (`heartbeat`) until the server stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = await asyncio.to_thread(load)
        spec = vision_spec_of(model_name, model)
        assert spec is not None
        store = EmbeddingStore(settings.lease_ttl_s, settings.max_held_bytes)
        source = EmbeddingSource(store, secret, settings.bind_host,
                                 advertise_host=settings.advertise_host).start()
        st = EncoderState(model, ImagePreparer(spec, limits),
                          EncodeBatcher(model.embed_images, settings.batch_window_s),
                          EmbeddingCache(settings.cache_bytes), store, source)
        app.state.encoder = st
        task = asyncio.create_task(heartbeat()) if heartbeat else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            st.close()

    app = FastAPI(title="pdserve encoder", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(AuthMiddleware, auth=HTTPAuth(api_key, secret, open_metrics,
                                                     ENCODER_INTERNAL_PATHS))
    http_limits.install(app, limits.body_bytes())
    _add_routes(app)
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/v1/encode")
    async def encode(request: Request) -> Response:
        st: EncoderState = request.app.state.encoder
        try:
            req = EncodeRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e.errors()) from None
        st.requests += 1
        refs = [ImageRef(img.url, img.detail, f"images[{i}].url")
                for i, img in enumerate(req.images)]
        try:
            prepared = await st.preparer.prepare(refs)
        except MediaError as e:
            raise bad_request(str(e), e.param) from None
        handles = await asyncio.gather(*(_handle(st, img) for img in prepared))
        return JSONResponse({"handles": [h.to_dict() for h in handles]})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        registry = CollectorRegistry()
        registry.register(_Collector(request.app.state.encoder))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _handle(st: EncoderState, image: PreparedImage) -> RemoteEmbedding:
    """The image's rows (cached, else encoded), held under a new lease for P."""
    key = image.input.content_hash
    rows = st.cache.get(key)
    if rows is None and key in st.encoding:
        rows = await asyncio.shield(st.encoding[key])
    elif rows is None:
        st.encoding[key] = asyncio.ensure_future(
            st.batcher.encode(image.input.pixel_values, image.input.num_tokens))
        try:
            rows = await asyncio.shield(st.encoding[key])
        finally:
            st.encoding.pop(key, None)
        st.cache.put(key, rows)
    held = st.store.hold(rows)
    if held is None:
        st.refused += 1
        raise APIError("the encoder holds as many rows as it may: P has not pulled them "
                       "yet", 503, "server_error", None, "encoder_full")
    lease_id, token = held
    return RemoteEmbedding(key.hex(), int(rows.shape[0]), int(rows.shape[1]),
                           str(rows.dtype).removeprefix("torch."), st.source.endpoint(),
                           lease_id, token)


class _Collector:
    """The encoder's counters, read at scrape time."""

    def __init__(self, st: EncoderState) -> None:
        self.st = st

    def collect(self):
        st = self.st
        st.store.expire()  # rows read since the last request are gone: not counted as held
        for name, doc, value in (
            ("encode_requests", "POST /v1/encode calls", st.requests),
            ("images_encoded", "images run through the vision tower", st.batcher.stats.images),
            ("tower_calls", "vision-tower calls (batches split by tile size)",
             st.batcher.stats.calls),
            ("cache_hits", "images answered from the embedding cache", st.cache.hits),
            ("embedding_reads", "rows read by prefill instances", st.source.reads),
            ("encode_refused", "images refused with 503: rows held past the limit",
             st.refused),
        ):
            yield CounterMetricFamily(f"pdserve_encoder_{name}", doc, value=value)
        for name, doc, value in (
            ("cache_bytes", "bytes of rows in the embedding cache", st.cache.bytes),
            ("held_bytes", "bytes of rows held under leases for P", st.store.held_bytes),
            ("largest_batch", "most images one batch gathered", st.batcher.stats.largest_batch),
        ):
            yield GaugeMetricFamily(f"pdserve_encoder_{name}", doc, value=value)
