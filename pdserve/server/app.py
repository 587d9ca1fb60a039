"""The FastAPI app of one instance: OpenAI completions and chat, models, health, metrics,
and the tool endpoints of tool_routes.py (/tokenize, /detokenize, /version, /ping)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve import http_limits
from pdserve.drain import Drain, DrainMiddleware, draining_health
from pdserve.http_auth import INSTANCE_INTERNAL_PATHS, AuthMiddleware, HTTPAuth
from pdserve.media.image_inputs import ImagePreparer
from pdserve.media.limits import MediaLimits
from pdserve.media.vision_spec import VisionSpec
from pdserve.security import DeploymentSecret
from pdserve.server.engine_client import EngineClient
from pdserve.server.errors import (
    APIError,
    bad_request,
    engine_dead,
    install_error_handlers,
    validation_error,
)
from pdserve.server.metrics import ServerMetrics, cache_info
from pdserve.server.protocol import IMAGE_PLACEHOLDER, ChatCompletionRequest, CompletionRequest
from pdserve.server.request_log import RequestLog
from pdserve.server.serving import ServerState, serve
from pdserve.server.tool_parsers import ParserName, parser_for_template
from pdserve.server.tool_routes import add_tool_routes, model_card
from pdserve.transfer.embedding_puller import EmbeddingPuller


def build_app(
    client: EngineClient,
    load_tokenizer: Callable[[], object],
    served_model_name: str | None = None,
    keep_registered: Callable[[], Awaitable[None]] | None = None,
    api_key: str | None = None,
    secret: DeploymentSecret | None = None,
    open_metrics: bool = False,
    drain: Drain | None = None,
    max_request_bytes: int = http_limits.DEFAULT_MAX_REQUEST_BYTES,
    tool_call_parser: ParserName | None = None,
    request_log: RequestLog | None = None,
    media_limits: MediaLimits | None = None,
) -> FastAPI:
    """The app; its lifespan starts the engine process and loads the tokenizer side by side,
    then runs `keep_registered` (heartbeats to a router) until the server stops. Clients
    need `api_key` (if set); the deployment's own calls are signed with `secret`. `drain`
    (a DrainingServer's) refuses new requests and finishes those in flight on SIGTERM. A
    body over `max_request_bytes` is refused with 413. `tool_call_parser` None: the one the
    chat template's family speaks. `request_log` logs each request. `media_limits` bound
    the images of a request to a model that takes them (the body limit grows to fit them)."""
    media_limits = media_limits or MediaLimits()
    body_limit = http_limits.MaxBody(max_request_bytes)  # grows to fit images, if it takes them

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info, tokenizer = await asyncio.gather(
            asyncio.to_thread(client.start), asyncio.to_thread(load_tokenizer)
        )
        client.attach(asyncio.get_running_loop())
        name = served_model_name or info.model_name
        metrics = ServerMetrics(name, lambda: client.stats, info.max_model_len,
                                cache_info(client.args),
                                kv_consumer=client.args.role != "colocated")  # P and D pull
        parser = tool_call_parser or parser_for_template(tokenizer.chat_template)
        try:
            images = _image_preparer(info.vision, tokenizer, media_limits)
        except RuntimeError:
            client.shutdown()  # the server will not start: its engine goes too
            raise
        if images is not None:
            body_limit.bytes = max(max_request_bytes, media_limits.body_bytes())
        # rows from encoder instances: only a deployment (a secret) has them
        embeddings = EmbeddingPuller(secret) if images is not None and secret else None
        app.state.server = ServerState(client, tokenizer, name, metrics, parser, request_log,
                                       images, embeddings)
        heartbeat = asyncio.create_task(keep_registered()) if keep_registered else None
        try:
            yield
        finally:
            if heartbeat is not None:  # cancelled, it deregisters: the router stops at once
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            client.shutdown()
            if images is not None:
                images.close()
            if embeddings is not None:
                embeddings.close()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.drain = drain or Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    install_error_handlers(app)
    app.add_middleware(AuthMiddleware, auth=HTTPAuth(api_key, secret, open_metrics,
                                                     INSTANCE_INTERNAL_PATHS))
    http_limits.install(app, body_limit)  # outermost
    _add_routes(app)
    return app


def _image_preparer(spec: VisionSpec | None, tokenizer,
                    limits: MediaLimits) -> ImagePreparer | None:
    """The model's image preparation, once its tokenizer is checked to name the image token
    the model fills (a mismatch would put embeddings at the wrong positions)."""
    if spec is None:
        return None
    if spec.image_token != IMAGE_PLACEHOLDER or \
            tokenizer.convert_tokens_to_ids(spec.image_token) != spec.image_token_id:
        raise RuntimeError(f"the tokenizer's {spec.image_token!r} is not the model's image "
                           f"token {spec.image_token_id}: serve the model's own tokenizer")
    return ImagePreparer(spec, limits)


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _health(request: Request) -> Response:
    client = _state(request).client
    if request.app.state.drain.draining:
        return draining_health()
    if not client.healthy:
        return JSONResponse(engine_dead().body(), status_code=503)
    return JSONResponse({"status": "ok", "engine_pid": client.info.pid})


def _add_routes(app: FastAPI) -> None:
    app.get("/health")(_health)
    add_tool_routes(app, _state, _parse, json_body, _health)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": [model_card(_state(request))]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await _handle(request, CompletionRequest)

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, ChatCompletionRequest)

    @app.post("/v1/kv/release", openapi_extra=json_body(KVReleaseRequest))
    async def kv_release(request: Request) -> Response:
        """On P: free a finished prefill's held KV now, because no decode instance will pull
        it (the router calls this when the hand-off to D failed or its client left).

        Body: `{"remote_request_id": "<id>", "lease_token": "<token>"}`, the values P put
        in its kv_transfer_params: the request id alone releases nothing.
        Answers 200 `{"queued": true}` once the release is handed to the engine, which frees
        the blocks at its next step; the engine does not answer, so an id that holds no lease
        (unknown, already pulled, expired) or a wrong token is queued the same and changes
        nothing. 400 if the body is wrong or this instance is not a prefill instance; 503 if
        the engine is dead (its blocks went with it)."""
        st = _state(request)
        body = await _parse(request, KVReleaseRequest)
        if st.client.args.role != "prefill":
            raise bad_request(f"only a prefill instance holds KV leases; this one runs with "
                              f"--role {st.client.args.role}")
        if not st.client.healthy:
            raise engine_dead()
        st.client.release_lease(body.remote_request_id, body.lease_token)
        return JSONResponse({"queued": True})


    @app.get("/v1/kv/events")
    async def kv_events(request: Request) -> Response:
        """The prefix cache's block hashes for a router (internal calls only): NDJSON lines,
        a snapshot, then the changes and the load (see pdserve/server/kv_event_hub.py).
        404 where the engine has no prefix cache to publish."""
        st = _state(request)
        hub = st.client.kv_events
        if not hub.block_size:
            raise APIError("this instance publishes no KV events (no prefix cache)", 404,
                           code="kv_events_unavailable")
        return StreamingResponse(hub.stream(lambda: _load(st.client)),
                                 media_type="application/x-ndjson")


def _load(client) -> dict:
    """What a router weighs besides the cache: the engine's queue and KV usage."""
    stats = client.stats
    return {"waiting": stats.num_waiting, "running": stats.num_running,
            "kv_usage": round(stats.kv_usage, 4)}


class KVReleaseRequest(BaseModel):
    """POST /v1/kv/release."""

    model_config = ConfigDict(strict=True, extra="ignore")

    remote_request_id: str = Field(min_length=1, max_length=256)
    lease_token: str = Field(min_length=1, max_length=256)  # the lease's capability


async def _handle(request: Request, model: type[CompletionRequest | ChatCompletionRequest]
                  ) -> Response:
    """Parse, validate and serve; refused requests are counted in /metrics by status."""
    st = _state(request)
    try:
        return await serve(request, st, await _parse(request, model))
    except APIError as exc:
        st.metrics.observe_error(exc.status_code)
        raise


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` that declares `model` as a route's JSON body in /openapi.json, for
    clients and fuzzers; the route still parses its raw body itself (400s, not FastAPI's 422).
    Pydantic's `$defs` are inlined: a `#/$defs/...` reference would point at the document root."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: object) -> object:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**inline(defs[node["$ref"].rsplit("/", 1)[-1]]), **inline(rest)}
        return {k: inline(v) for k, v in node.items()}

    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": inline(schema)}}}}


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """Body bytes → validated request; every failure is a 4xx with a readable message
    (400, or 413 for a body over the size limit)."""
    try:
        data = await http_limits.read_json_body(request)
    except http_limits.BodyError as exc:
        raise APIError(exc.message, exc.status_code, code=exc.code) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc

