"""The router's answers to the endpoints tools call beside the OpenAI API (vLLM's shapes):
/tokenize and /detokenize go to any healthy instance (every role has the tokenizer);
/version, /ping and GET /v1/models/{model_id} the router answers itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.http_probes import add_probe_routes
from pdserve.router.pairing import least_loaded
from pdserve.router.proxy import Router, json_error
from pdserve.router.registry import ROLES
from pdserve.router.upstream import Refused, UpstreamError
from pdserve.router.validation import read_request
from pdserve.server.app import json_body
from pdserve.server.errors import model_not_found
from pdserve.server.protocol import DetokenizeRequest, TokenizeRequest


async def forward(router: Router, path: str, body: dict) -> Response:
    """One instance's answer to `body`, whatever its role; tries the next on a failure."""
    tried: set[str] = set()
    while True:
        candidates = [least_loaded(router.registry.healthy(role), tried) for role in ROLES]
        inst = next((c for c in candidates if c is not None), None)
        if inst is None:
            return json_error(503, "no healthy instance", "no_healthy_instance")
        tried.add(inst.url)
        try:
            resp = await router.upstream.post(inst, path, body)
        except Refused as exc:  # the client's fault (a bad token id, an unknown model)
            return Response(exc.content, exc.status_code, media_type="application/json")
        except UpstreamError:
            continue  # marked unhealthy: the next instance, if any
        return Response(resp.content, resp.status_code, media_type="application/json")


def add_tool_routes(app: FastAPI, router: Callable[[Request], Router],
                    models: Callable[[Request], Awaitable[list[dict]]],
                    health: Callable[[Request], Awaitable[Response]]) -> None:
    """Install the routes on the router's app (`models`: the healthy instances' model cards;
    `health`: the answer of /health)."""

    async def forwarded(request: Request, path: str) -> Response:
        body = await read_request(request, path)  # refused here as an instance would
        if isinstance(body, Response):
            return body
        return await forward(router(request), path, body)

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        return await forwarded(request, "/tokenize")

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        return await forwarded(request, "/detokenize")

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        card = next((c for c in await models(request) if c.get("id") == model_id), None)
        if card is None:
            err = model_not_found(model_id)
            return JSONResponse(err.body(), err.status_code)
        return JSONResponse(card)

    add_probe_routes(app, health)
