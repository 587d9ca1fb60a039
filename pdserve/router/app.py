"""The router's FastAPI app: the OpenAI front door, registration, health, metrics, and the
tool endpoints of tool_routes.py (/tokenize, /detokenize, /version, /ping)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import asynccontextmanager

import aiohttp
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pdserve import http_limits
from pdserve.drain import Drain, DrainMiddleware, draining_health
from pdserve.http_auth import ROUTER_INTERNAL_PATHS, AuthMiddleware, HTTPAuth
from pdserve.race import run_until
from pdserve.router.health import check, poll_forever
from pdserve.router.kv_subscriber import Subscriptions
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policy import make_policy
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.proxy import Router, json_error
from pdserve.router.registry import REGISTRABLE, Registry
from pdserve.router.tool_routes import add_tool_routes
from pdserve.router.upstream import CALL_ERRORS, Upstream, new_session
from pdserve.router.validation import read_request
from pdserve.security import DeploymentSecret
from pdserve.server.app import json_body
from pdserve.server.errors import install_error_handlers
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest


def build_app(registry: Registry, health_interval_s: float = 1.0,
              pd_min_prompt_tokens: int = 0, api_key: str | None = None,
              secret: DeploymentSecret | None = None, open_metrics: bool = False,
              drain: Drain | None = None,
              max_request_bytes: int = http_limits.DEFAULT_MAX_REQUEST_BYTES,
              routing_policy: str = "least_loaded", tokenizer: str | None = None,
              pd_max_stall_s: float | None = None) -> FastAPI:
    """The app; its lifespan opens the HTTP client to instances and starts health checks.
    Clients need `api_key` (if set); `secret` signs the calls to instances and admits the
    instances' own calls (/register); without it nobody can register. `drain` (a
    DrainingServer's) refuses new requests and finishes those in flight. A body over
    `max_request_bytes` is refused with 413. `routing_policy` names the policy of
    policy.py; a cache-aware one follows the instances' KV events and tokenizes prompts
    with `tokenizer` (the instances' model or tokenizer path; None: token-id prompts only);
    `pd_max_stall_s` bounds the conditional policy's whole-on-D stalls (None: D's hop)."""
    policy = make_policy(routing_policy, pd_min_prompt_tokens, pd_max_stall_s=pd_max_stall_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        session = new_session()
        metrics = RouterMetrics(registry)
        app.state.upstream = Upstream(session, metrics, secret)
        router = Router(registry, app.state.upstream, metrics, policy,
                        tokens=PromptTokenizer(tokenizer))
        app.state.router = router
        tasks = [asyncio.create_task(poll_forever(session, registry, health_interval_s))]
        if policy.uses_cache:
            tasks.append(asyncio.create_task(router.tokens.load()))
            follow = Subscriptions(session, registry, router.index, secret)
            tasks.append(asyncio.create_task(follow.run(health_interval_s)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()

    app = FastAPI(title="pdserve router", lifespan=lifespan)
    app.state.drain = drain or Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(AuthMiddleware, auth=HTTPAuth(api_key, secret, open_metrics,
                                                     ROUTER_INTERNAL_PATHS))
    http_limits.install(app, max_request_bytes)  # outermost: before any read
    install_error_handlers(app)  # a path no route matches: an OpenAI 404, as instances give
    _add_openai_routes(app)
    _add_registry_routes(app, registry)
    return app


def _router(request: Request) -> Router:
    return request.app.state.router


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`; if the client leaves first, cancel it (closing upstream requests)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = await run_until(work, watch())
    if task.done():
        return task.result()
    task.cancel()
    _router(request).metrics.client_disconnects.inc()
    return Response(status_code=499)  # nobody reads it


async def _proxy(request: Request, path: str) -> Response:
    body = await read_request(request, path)  # refused here as an instance would refuse it
    if isinstance(body, Response):
        return body
    if "kv_transfer_params" in body:  # the router signs what it forwards: refuse, not strip
        return json_error(400, "kv_transfer_params are internal to the deployment; a client "
                          "may not send them", None, "invalid_request_error")
    return await _until_disconnect(request, _router(request).route(path, body))


async def _model_cards(request: Request) -> list[dict]:
    """The union of the healthy instances' models, each asked for its /v1/models."""
    router, upstream = _router(request), request.app.state.upstream
    cards: dict[str, dict] = {}
    for inst in router.registry.engines():  # encoders list no model
        if not inst.healthy:
            continue
        try:
            _, headers = upstream.signed("GET", "/v1/models")
            async with upstream.session.get(inst.url + "/v1/models", headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
                listing = orjson.loads(await resp.read())
            for card in listing.get("data", []):
                cards.setdefault(card["id"], card)
        except (*CALL_ERRORS, ValueError, KeyError, TypeError, AttributeError):
            continue
    return list(cards.values())


async def _health(request: Request) -> Response:
    registry = _router(request).registry
    if request.app.state.drain.draining:
        return draining_health()
    if registry.can_serve():
        return JSONResponse({"status": "ok"})
    return json_error(503, "no healthy instance", "no_healthy_instance")


def _add_openai_routes(app: FastAPI) -> None:
    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await _proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await _proxy(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        """The union of the healthy instances' models."""
        return JSONResponse({"object": "list", "data": await _model_cards(request)})

    app.get("/health")(_health)
    add_tool_routes(app, _router, _model_cards, _health)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_router(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _object_body(properties: dict) -> dict:
    """`openapi_extra` declaring a JSON object body with these properties, `url` required."""
    schema = {"type": "object", "properties": properties, "required": ["url"]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _add_registry_routes(app: FastAPI, registry: Registry) -> None:
    @app.post("/register", openapi_extra=_object_body(
        {"url": {"type": "string"}, "role": {"type": "string", "enum": list(REGISTRABLE)}}))
    async def register(request: Request) -> Response:
        """Join, or heartbeat: `{"url": ..., "role": ...}`, re-posted every few seconds."""
        try:
            data = await http_limits.read_json_body(request)
            inst = registry.register(str(data["url"]), str(data.get("role", "colocated")))
        except (ValueError, KeyError, TypeError) as exc:  # BodyError: its own 4xx
            return json_error(400, f"register needs {{url, role in {REGISTRABLE}}}: {exc}", None,
                              "invalid_request_error")
        if not inst.healthy:  # a newcomer serves as soon as it answers, not a poll later
            await check(request.app.state.upstream.session, inst, timeout_s=2.0)
        return JSONResponse({"status": "ok", "instance": inst.to_json(),
                             "heartbeat_ttl_s": registry.heartbeat_ttl_s})

    @app.post("/deregister", openapi_extra=_object_body({"url": {"type": "string"}}))
    async def deregister(request: Request) -> Response:
        """Leave at once: `{"url": ...}`."""
        try:
            url = str((await http_limits.read_json_body(request))["url"])
        except (ValueError, KeyError, TypeError) as exc:  # BodyError: its own 4xx
            return json_error(400, f"deregister needs {{url}}: {exc}", None,
                              "invalid_request_error")
        return JSONResponse({"status": "ok", "removed": registry.deregister(url)})

    @app.get("/instances")
    async def instances() -> dict:
        return {"instances": [i.to_json() for i in registry.all()]}
