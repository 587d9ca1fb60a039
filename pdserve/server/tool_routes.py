"""The endpoints tools call beside the OpenAI API, in vLLM's shapes: /tokenize, /detokenize
(`vllm bench serve` aligns prompt lengths with them), /version, /ping (vLLM's and
SageMaker's health probe) and GET /v1/models/{model_id}."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.http_probes import add_probe_routes
from pdserve.media.image_inputs import PreparedImage
from pdserve.server.errors import model_not_found
from pdserve.server.images import prepare_images
from pdserve.server.prompts import chat_prompt_ids, check_token_ids, encode_text
from pdserve.server.protocol import DetokenizeRequest, TokenizeRequest
from pdserve.server.serving import ServerState


def model_card(st: ServerState) -> dict:
    """The one model this instance serves, as OpenAI's /v1/models lists it."""
    return {"id": st.served_model_name, "object": "model", "created": 0,
            "owned_by": "pdserve", "max_model_len": st.client.info.max_model_len}


def tokenize(st: ServerState, req: TokenizeRequest,
             images: list[PreparedImage] | None = None) -> dict:
    """vLLM's /tokenize answer: the ids a completion or chat request would send the engine
    (a chat's `images`, prepared, expanded into its image tokens)."""
    special = req.with_special_tokens()
    if req.messages is not None:
        ids = chat_prompt_ids(st.tokenizer, req.messages, req.add_generation_prompt,
                              req.continue_final_message, special, images=images)
    else:
        ids = encode_text(st.tokenizer, req.prompt, special)
    strs = st.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": st.client.info.max_model_len,
            "tokens": ids, "token_strs": strs}


def detokenize(st: ServerState, req: DetokenizeRequest) -> dict:
    check_token_ids(req.tokens, st.client.info.vocab_size, "tokens")
    return {"prompt": st.tokenizer.decode(req.tokens)}


def add_tool_routes(app: FastAPI, state: Callable[[Request], ServerState],
                    parse: Callable[[Request, type], Awaitable], json_body: Callable[[type], dict],
                    health: Callable[[Request], Awaitable[Response]]) -> None:
    """Install the routes on an instance's app (`parse` reads a body into a model, 400s on
    anything wrong; `health` answers /health)."""

    def check_model(st: ServerState, model: str | None) -> None:
        if model is not None and model != st.served_model_name:
            raise model_not_found(model)

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize_route(request: Request) -> Response:
        st, req = state(request), await parse(request, TokenizeRequest)
        check_model(st, req.model)
        images = await prepare_images(st.images, req.messages) if req.messages else None
        # a chat template over long messages is CPU work: off the event loop
        return JSONResponse(await asyncio.to_thread(tokenize, st, req, images))

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize_route(request: Request) -> Response:
        st, req = state(request), await parse(request, DetokenizeRequest)
        check_model(st, req.model)
        return JSONResponse(await asyncio.to_thread(detokenize, st, req))

    @app.get("/v1/models/{model_id:path}")
    async def model_route(request: Request, model_id: str) -> Response:
        st = state(request)
        check_model(st, model_id)
        return JSONResponse(model_card(st))

    add_probe_routes(app, health)
