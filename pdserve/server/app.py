"""The FastAPI app of one instance: OpenAI completions and chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from pdserve.engine.outputs import EngineRequest
from pdserve.server.engine_client import EngineClient
from pdserve.server.errors import (
    APIError,
    bad_request,
    engine_dead,
    install_error_handlers,
    model_not_found,
)
from pdserve.server.generation import Generation
from pdserve.server.metrics import ServerMetrics
from pdserve.server.prompts import chat_prompt_ids, completion_prompt_ids, resolve_max_tokens
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.server.responses import ResponseBuilder, sse

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the context


@dataclass
class ServerState:
    """What the routes share once the engine and tokenizer are up."""

    client: EngineClient
    tokenizer: object
    served_model_name: str
    metrics: ServerMetrics


def build_app(
    client: EngineClient,
    load_tokenizer: Callable[[], object],
    served_model_name: str | None = None,
) -> FastAPI:
    """The app; its lifespan starts the engine process and loads the tokenizer side by side."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info, tokenizer = await asyncio.gather(
            asyncio.to_thread(client.start), asyncio.to_thread(load_tokenizer)
        )
        client.attach(asyncio.get_running_loop())
        name = served_model_name or info.model_name
        app.state.server = ServerState(client, tokenizer, name,
                                       ServerMetrics(name, lambda: client.stats))
        try:
            yield
        finally:
            client.shutdown()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    install_error_handlers(app)
    _add_routes(app)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        client = _state(request).client
        if not client.healthy:
            return JSONResponse(engine_dead().body(), status_code=503)
        return JSONResponse({"status": "ok", "engine_pid": client.info.pid})

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        st = _state(request)
        card = {"id": st.served_model_name, "object": "model", "created": 0,
                "owned_by": "pdserve", "max_model_len": st.client.info.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _counted(request, _serve(request, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _counted(request, _serve(request, chat=True))


async def _counted(request: Request, handler) -> Response:
    """Count refused requests in /metrics by status."""
    try:
        return await handler
    except APIError as exc:
        _state(request).metrics.observe_error(exc.status_code)
        raise


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """Body bytes → validated request; every failure is a 400 with a readable message."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise bad_request(f"Request body is not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more error(s))" if exc.error_count() > 1 else ""
    text = f"{'.'.join(loc)}: {msg}{more}" if loc else f"{msg}{more}"
    return bad_request(text, loc[0] if loc else None)


async def _serve(request: Request, chat: bool) -> Response:
    st = _state(request)
    req = await _parse(request, ChatCompletionRequest if chat else CompletionRequest)
    if req.model is not None and req.model != st.served_model_name:
        raise model_not_found(req.model)
    if not st.client.healthy:
        raise engine_dead()
    if chat:
        prompt_ids = chat_prompt_ids(st.tokenizer, req.messages, req.add_generation_prompt)
        default_max = None
    else:
        prompt_ids = completion_prompt_ids(st.tokenizer, req.single_prompt())
        default_max = COMPLETIONS_DEFAULT_MAX_TOKENS
    info = st.client.info
    max_tokens = resolve_max_tokens(prompt_ids, req.max_tokens, default_max,
                                    info.vocab_size, info.max_model_len)
    if req.min_tokens > max_tokens:
        raise bad_request("min_tokens must not exceed max_tokens", "min_tokens")
    _check_token_ids(req.stop_token_ids or [], info.vocab_size, "stop_token_ids")
    _check_fits_cache(len(prompt_ids) + max_tokens, st.client)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    engine_req = EngineRequest(request_id, prompt_ids, req.sampling_params(max_tokens),
                               kv_transfer_params=req.kv_transfer_params)
    gen = Generation(st.client, st.metrics, st.tokenizer, engine_req, req.stop_strings(),
                     req.include_stop_str_in_output, req.skip_special_tokens)
    builder = ResponseBuilder(chat, request_id, st.served_model_name, st.tokenizer,
                              req.num_logprobs(), req.return_tokens_as_token_ids)
    if req.stream:
        events = _stream(gen, builder, chat, req.include_usage())
        return StreamingResponse(_watching(request, gen, events),
                                 media_type="text/event-stream")
    return await _complete(request, gen, builder)


def _check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (size {vocab_size})", param)


def _check_fits_cache(num_tokens: int, client: EngineClient) -> None:
    """A request larger than the whole KV cache could never be scheduled: refuse it now."""
    block_size, total = client.args.cache.block_size, client.stats.num_total_blocks
    if total and -(-num_tokens // block_size) > total:
        raise bad_request(
            f"the request needs {num_tokens} tokens of KV cache but this instance holds "
            f"{total * block_size}; shorten the prompt or max_tokens", "max_tokens",
        )


async def _complete(request: Request, gen: Generation, builder: ResponseBuilder) -> Response:
    """Run to the end, then answer with one body."""
    text, logprobs, finish, stop_reason = "", [], None, None

    async def collect() -> None:
        nonlocal text, finish, stop_reason
        async for delta in gen.deltas():
            text += delta.text
            logprobs.extend(delta.logprobs)
            finish, stop_reason = delta.finish_reason, delta.stop_reason

    async for _ in _watching(request, gen, _as_stream(collect())):
        pass
    if finish is None:  # the client left: nobody reads this
        return Response(status_code=499)
    body = builder.full(text, logprobs, finish, stop_reason, gen.usage(),
                        gen.kv_transfer_params)
    return JSONResponse(body)


async def _as_stream(coro) -> AsyncIterator[None]:
    await coro
    yield None


async def _stream(gen: Generation, builder: ResponseBuilder, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """SSE events: chunks as tokens arrive, then usage if asked, then [DONE]."""
    if chat:
        first = builder.role_chunk()
        if include_usage:
            first["usage"] = None
        yield sse(first)
    offset = 0
    try:
        async for delta in gen.deltas():
            yield sse(builder.chunk(delta, offset, gen.kv_transfer_params, include_usage))
            offset += len(delta.text)
    except APIError as exc:  # headers are sent: the error travels in the stream
        yield sse(exc.body())
        yield sse("[DONE]")
        return
    if include_usage:
        yield sse(builder.usage_chunk(gen.usage()))
    yield sse("[DONE]")


async def _watching(request: Request, gen: Generation,
                    events: AsyncIterator) -> AsyncIterator:
    """Pass `events` through; if the client disconnects meanwhile, abort the generation."""

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gen.cancel()

    watcher = asyncio.create_task(wait_disconnect())
    try:
        async for event in events:
            yield event
    finally:
        watcher.cancel()

