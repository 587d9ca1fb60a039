"""Serving one validated completion or chat request: prompt → engine → JSON body or SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdserve.engine.grammar import GrammarSpec, check_grammar
from pdserve.engine.outputs import EngineRequest
from pdserve.event_stream import EventStream, sse
from pdserve.server.engine_client import EngineClient
from pdserve.server.errors import APIError, bad_request, engine_dead, model_not_found
from pdserve.server.generation import Delta, Generation
from pdserve.server.handoff import accept_handoff
from pdserve.server.metrics import ServerMetrics
from pdserve.server.prompts import (
    chat_prompt_ids,
    check_fits_cache,
    check_token_ids,
    completion_prompt_ids,
    resolve_max_tokens,
)
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.server.responses import ResponseBuilder
from pdserve.server.structured_protocol import FieldError
from pdserve.server.tool_calls import ToolCallExtractor
from pdserve.server.tool_parsers import ParserName

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the context


@dataclass
class ServerState:
    """What the routes share once the engine and tokenizer are up."""

    client: EngineClient
    tokenizer: object
    served_model_name: str
    metrics: ServerMetrics
    tool_parser: ParserName = "hermes"  # the format of tool calls in the model's text

    def cache_tokens(self) -> int:
        """Tokens the whole KV cache holds (0 = not known yet)."""
        return self.client.stats.num_total_blocks * self.client.args.cache.block_size


async def serve(
    request: Request, st: ServerState, req: CompletionRequest | ChatCompletionRequest
) -> Response:
    """Answer one request, streaming or not; raises APIError for anything refused."""
    chat = isinstance(req, ChatCompletionRequest)
    if req.model is not None and req.model != st.served_model_name:
        raise model_not_found(req.model)
    if not st.client.healthy:
        raise engine_dead()
    internal = getattr(request.state, "internal", False)  # AuthMiddleware verified its MAC
    if req.resume is not None and not internal:
        raise bad_request("resume is an internal field: only the router may send it", "resume")
    # chat templating and tokenization are CPU work (seconds for a huge prompt): off the loop
    engine_req = await asyncio.to_thread(_checked_engine_request, st, req, chat)
    # a hand-off only from the deployment (a 400 otherwise): trust-http marks internal calls
    engine_req.handoff = accept_handoff(req.kv_transfer_params, engine_req.prompt_token_ids,
                                        st.client.args, internal, st.client.info.vocab_size)
    gen = Generation(st.client, st.metrics, st.tokenizer, engine_req, req.stop_strings(),
                     req.include_stop_str_in_output, req.skip_special_tokens,
                     resume_text_chars=req.resume.text_chars if req.resume else 0,
                     max_tokens_param=req.max_tokens)
    builder = ResponseBuilder(chat, engine_req.request_id, st.served_model_name, st.tokenizer,
                              req.num_logprobs(), req.return_tokens_as_token_ids,
                              token_ids=req.return_token_ids)
    tools = _tool_extractor(req, st.tool_parser)
    if req.stream:
        await gen.start()  # before the headers: a request the engine refuses gets a 400
        # the generation is aborted however the response ends (a no-op once it finished)
        return EventStream(_stream(request, gen, builder, req.include_usage(), tools),
                           gen.cancel)
    return await _complete(request, gen, builder, tools)


def _engine_request(
    st: ServerState, req: CompletionRequest | ChatCompletionRequest, chat: bool
) -> EngineRequest:
    """Tokenize and check the prompt, settle max_tokens, and build the engine's request."""
    if chat:
        _check_tools(req)
        tools = req.tool_dicts() if req.tool_mode() != "none" else None
        prompt_ids = chat_prompt_ids(st.tokenizer, req.messages, req.add_generation_prompt,
                                     tools=tools, parser=st.tool_parser)
    else:
        prompt_ids = completion_prompt_ids(st.tokenizer, req.single_prompt())
    info = st.client.info
    default = None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    max_tokens = resolve_max_tokens(prompt_ids, req.max_tokens, default, info.vocab_size,
                                    info.max_model_len)
    room = st.cache_tokens() - len(prompt_ids)
    if req.max_tokens is None and room > 0:  # an unasked-for default must fit the cache too
        max_tokens = min(max_tokens, room)
    if req.min_tokens > max_tokens:
        raise bad_request("min_tokens must not exceed max_tokens", "min_tokens")
    check_token_ids(req.stop_token_ids or [], info.vocab_size, "stop_token_ids")
    check_fits_cache(len(prompt_ids) + max_tokens, st.cache_tokens())
    resumed = req.resume.token_ids if req.resume else []  # output another instance made
    if len(resumed) >= max_tokens:
        raise bad_request("resume.token_ids must leave a token to generate", "resume")
    check_token_ids(resumed, info.vocab_size, "resume")
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    params = req.sampling_params(max_tokens)
    params.grammar = checked_grammar(req)
    return EngineRequest(request_id, prompt_ids, params, output_token_ids=list(resumed))


def _checked_engine_request(
    st: ServerState, req: CompletionRequest | ChatCompletionRequest, chat: bool
) -> EngineRequest:
    """`_engine_request`, and on a router's prefill request the check D will make of the
    client's max_tokens (P itself runs one token), so that the router hears it first."""
    engine_req = _engine_request(st, req, chat)
    if req.decode_max_tokens is not None:
        prompt_ids, info = engine_req.prompt_token_ids, st.client.info
        resolve_max_tokens(prompt_ids, req.decode_max_tokens, None, info.vocab_size,
                           info.max_model_len)
        check_fits_cache(len(prompt_ids) + req.decode_max_tokens, st.cache_tokens())
    return engine_req


def checked_grammar(req: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
    """The structured output asked for, parsed (a 400 naming the field if it is invalid)."""
    try:
        spec = req.grammar_spec()
    except FieldError as exc:
        raise bad_request(str(exc), exc.field) from exc
    if spec is None and isinstance(req, ChatCompletionRequest):
        spec = _tool_grammar(req)
    if spec is None:
        return None
    if req.min_tokens:  # its EOS ban could leave a complete grammar no token at all
        raise bad_request("min_tokens cannot be combined with structured output", "min_tokens")
    return spec


def _check_tools(req: ChatCompletionRequest) -> None:
    try:
        req.check_tools()
    except FieldError as exc:
        raise bad_request(str(exc), exc.field) from exc


def _tool_grammar(req: ChatCompletionRequest) -> GrammarSpec | None:
    """tool_choice required or named: the grammar of the call(s), checked."""
    try:
        spec = req.tool_grammar()
        if spec is not None:
            check_grammar(spec)
    except ValueError as exc:
        raise bad_request(f"tools: {exc}", "tools") from exc
    return spec


def _tool_extractor(req, parser: ParserName) -> ToolCallExtractor | None:
    """Chat with tools in use: what takes the calls out of the reply."""
    if not isinstance(req, ChatCompletionRequest) or req.tool_mode() == "none":
        return None
    return ToolCallExtractor(req.tool_mode(), parser, {t.function.name for t in req.tools},
                             req.named_function())


@asynccontextmanager
async def _abort_on_disconnect(request: Request, gen: Generation):
    """While inside, a client that disconnects aborts the generation (and frees its blocks)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gen.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def _complete(request: Request, gen: Generation, builder: ResponseBuilder,
                    tools: ToolCallExtractor | None) -> Response:
    """Run to the end, then answer with one body."""
    text, logprobs, finish, stop_reason, token_ids = "", [], None, None, []
    async with _abort_on_disconnect(request, gen):
        await gen.start()
        async for delta in gen.deltas():
            text += delta.text
            token_ids += delta.token_ids
            logprobs.extend(delta.logprobs)
            finish, stop_reason = delta.finish_reason, delta.stop_reason
    if finish is None:  # the client left: nobody reads this
        return Response(status_code=499)
    calls = None
    if tools is not None:  # the reply's tool calls out of its text
        text = tools.feed(text) + tools.finish()
        finish, calls = tools.finish_reason(finish), [c.to_openai() for c in tools.calls]
    body = builder.full(text, logprobs, finish, stop_reason, gen.usage(),
                        gen.kv_transfer_params, token_ids, calls)
    return JSONResponse(body)


async def _stream(request: Request, gen: Generation, builder: ResponseBuilder,
                  include_usage: bool, tools: ToolCallExtractor | None) -> AsyncIterator[str]:
    """SSE events: chunks as tokens arrive, then usage if asked, then [DONE]."""
    if builder.chat:
        first = builder.role_chunk()
        if include_usage:
            first["usage"] = None
        yield sse(first)
    offset = 0
    async with _abort_on_disconnect(request, gen):
        try:
            async for delta in gen.deltas():
                if tools is not None:
                    for chunk in _tool_chunks(builder, tools, delta, include_usage):
                        yield sse(chunk)
                    continue
                yield sse(builder.chunk(delta, offset, gen.kv_transfer_params, include_usage))
                offset += len(delta.text)
        except APIError as exc:  # the headers are sent: the error travels in the stream
            yield sse(exc.body())
            yield sse("[DONE]")
            return
    if include_usage:
        yield sse(builder.usage_chunk(gen.usage()))
    yield sse("[DONE]")


def _tool_chunks(builder: ResponseBuilder, tools: ToolCallExtractor, delta: Delta,
                 include_usage: bool) -> list[dict]:
    """A delta of a reply with tools: its content as far as it can be no call, and at the
    end the calls (each: its id and name first, then its arguments), then the finish."""
    text = tools.feed(delta.text)
    finish = delta.finish_reason
    if finish is not None:
        text += tools.finish()
    chunks = []
    if text or delta.logprobs or (builder.token_ids and delta.token_ids):
        chunks.append(builder.chunk(dataclasses.replace(delta, text=text, finish_reason=None,
                                                        stop_reason=None),
                                    0, None, include_usage))
    if finish is not None:
        for index, call in enumerate(tools.calls):
            chunks += builder.tool_call_chunks(index, call.to_openai(), include_usage)
        chunks.append(builder.chunk(Delta("", [], finish_reason=tools.finish_reason(finish),
                                          stop_reason=delta.stop_reason),
                                    0, None, include_usage))
    return chunks
