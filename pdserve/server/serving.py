"""Serving one validated completion or chat request: prompt → engine → JSON body or SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdserve.engine.grammar import GrammarSpec, check_grammar
from pdserve.engine.outputs import EngineRequest
from pdserve.event_stream import EventStream, sse
from pdserve.media.image_inputs import ImagePreparer, PreparedImage
from pdserve.server.choices import (
    Choice,
    cancel_all,
    collect_all,
    interleaved,
    start_all,
    usage,
)
from pdserve.server.encoder_handles import count_local, parse_handles, pull_embeddings
from pdserve.server.engine_client import EngineClient
from pdserve.server.errors import APIError, bad_request, engine_dead, model_not_found
from pdserve.server.generation import Delta, Generation
from pdserve.server.handoff import accept_handoff
from pdserve.server.images import prepare_images
from pdserve.server.metrics import ServerMetrics
from pdserve.server.prompts import (
    chat_prompt_ids,
    check_fits_cache,
    check_token_ids,
    completion_prompt_ids,
    resolve_max_tokens,
)
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.server.request_log import RequestLog
from pdserve.server.responses import ResponseBuilder
from pdserve.server.structured_protocol import FieldError
from pdserve.server.tool_calls import ToolCallExtractor
from pdserve.server.tool_parsers import ParserName
from pdserve.transfer.embedding_puller import EmbeddingPuller

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the context


@dataclass
class ServerState:
    """What the routes share once the engine and tokenizer are up."""

    client: EngineClient
    tokenizer: object
    served_model_name: str
    metrics: ServerMetrics
    tool_parser: ParserName = "hermes"  # the format of tool calls in the model's text
    request_log: RequestLog | None = None  # --log-requests
    images: ImagePreparer | None = None  # None: the model takes no images
    embeddings: EmbeddingPuller | None = None  # pulls rows an encoder instance made

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
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    images = await prepare_images(st.images, req.messages) if chat else None  # bounded pool
    if chat and req.encoder_handles is not None:  # the router's: rows from encoder instances
        handles = parse_handles(req.encoder_handles, images, internal)
        if images and st.embeddings is not None:
            images = await pull_embeddings(st.embeddings, images, handles,
                                           st.client.info.hidden_size, st.metrics)
    elif images and not (req.kv_transfer_params or {}).get("do_remote_prefill"):
        count_local(st.metrics, len(images))  # D pulls KV: it encodes none of them
    # chat templating and tokenization are CPU work (seconds for a huge prompt): off the loop
    choices = await asyncio.to_thread(_choices, st, req, chat, response_id, images)
    del images  # each engine request holds its images until the engine has them
    if len(choices) == 1:  # n > 1 and batches refuse kv_transfer_params (protocol.py)
        # a hand-off only from the deployment (a 400 otherwise): trust-http marks internal calls
        engine_req = choices[0].gen.request
        engine_req.handoff = accept_handoff(req.kv_transfer_params, engine_req.prompt_token_ids,
                                            st.client.args, internal,
                                            st.client.info.vocab_size)
    builder = ResponseBuilder(chat, response_id, st.served_model_name, st.tokenizer,
                              req.num_logprobs(), req.return_tokens_as_token_ids,
                              token_ids=req.return_token_ids)
    tools = _tool_extractor(req, st.tool_parser)
    if req.stream:
        await start_all(choices)  # before the headers: a request the engine refuses gets a 400
        # the generations are aborted however the response ends (a no-op once they finished)
        return EventStream(_stream(request, choices, builder, req.include_usage(), tools),
                           cancel_all(choices))
    return await _complete(request, choices, builder, tools)


def _choices(st: ServerState, req: CompletionRequest | ChatCompletionRequest, chat: bool,
             response_id: str, images: list[PreparedImage] | None = None) -> list[Choice]:
    """One Choice per (prompt, i < n), prompt-major; siblings share their prompt's prefill
    and draw with seed + i, so that seeded choices differ. `images`: the chat's, prepared
    (None: the model takes none)."""
    if chat:
        _check_tools(req)
        tools = req.tool_dicts() if req.tool_mode() != "none" else None
        if tools and req.n > 1:  # tool calls are parsed out of one reply
            raise bad_request("n > 1 cannot be combined with tools", "n")
        prompts = [chat_prompt_ids(st.tokenizer, req.messages, req.add_generation_prompt,
                                   tools=tools, parser=st.tool_parser, images=images)]
        texts = [""]
        given = [[{"role": m.role, "content": m.text()} for m in req.messages]]
    else:
        given = req.prompts()
        prompts = [completion_prompt_ids(st.tokenizer, p) for p in given]
        texts = [_echo_text(st.tokenizer, p) if req.echo else "" for p in given]
    check_token_ids(list(req.logit_bias_ids()), st.client.info.vocab_size, "logit_bias")
    single = len(prompts) * req.n == 1
    choices = []
    for p, (prompt_ids, echo) in enumerate(zip(prompts, texts)):
        leader = None
        for i in range(req.n):
            index = p * req.n + i
            engine_req = _checked_engine_request(
                st, req, prompt_ids, response_id if single else f"{response_id}-{index}")
            engine_req.images = [img.input for img in images or []]
            if i:
                engine_req.prefill_after = leader
                if req.seed is not None:
                    engine_req.params = replace(engine_req.params, seed=req.seed + i)
            else:
                leader = engine_req.request_id
                if st.request_log is not None:
                    st.request_log.request(leader, given[p], prompt_ids, engine_req.params,
                                           req.n)
            gen = Generation(st.client, st.metrics, st.tokenizer, engine_req,
                             req.stop_strings(), req.include_stop_str_in_output,
                             req.skip_special_tokens,
                             resume_text_chars=req.resume.text_chars if req.resume else 0,
                             max_tokens_param=req.max_tokens, n_param=0 if i else req.n)
            choices.append(Choice(index, gen, echo, first_of_prompt=i == 0))
    return choices


def _echo_text(tokenizer, prompt: str | list[int]) -> str:
    """The prompt as echo returns it: the client's text, or its token ids' text."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _engine_request(
    st: ServerState, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
    request_id: str,
) -> EngineRequest:
    """Check the prompt, settle max_tokens, and build the engine's request."""
    chat = isinstance(req, ChatCompletionRequest)
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
    params = req.sampling_params(max_tokens)
    params.grammar = checked_grammar(req)
    return EngineRequest(request_id, prompt_ids, params, output_token_ids=list(resumed))


def _checked_engine_request(
    st: ServerState, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
    request_id: str,
) -> EngineRequest:
    """`_engine_request`, and on a router's prefill request the check D will make of the
    client's max_tokens (P itself runs one token), so that the router hears it first."""
    engine_req = _engine_request(st, req, prompt_ids, request_id)
    if req.decode_max_tokens is not None:
        info = st.client.info
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
async def _abort_on_disconnect(request: Request, cancel: Callable[[], object]):
    """While inside, a client that disconnects aborts the generations (and frees blocks)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def _complete(request: Request, choices: list[Choice], builder: ResponseBuilder,
                    tools: ToolCallExtractor | None) -> Response:
    """Run every choice to its end, then answer with one body; with tools (one choice), the
    reply's tool calls are taken out of its text."""
    async with _abort_on_disconnect(request, cancel_all(choices)):
        await start_all(choices)
        results = await collect_all(choices)
    if any(r.finish is None for r in results):  # the client left: nobody reads this
        return Response(status_code=499)
    bodies = []
    for c, r in zip(choices, results):
        text, finish, calls = r.text, r.finish, None
        if tools is not None:
            text = tools.feed(text) + tools.finish()
            finish, calls = tools.finish_reason(finish), [t.to_openai() for t in tools.calls]
        bodies.append(builder.full_choice(c.index, text, r.logprobs, finish, r.stop_reason,
                                          r.token_ids, calls))
    body = builder.full(bodies, usage(choices),
                        choices[0].gen.kv_transfer_params if len(choices) == 1 else None)
    return JSONResponse(body)


async def _stream(request: Request, choices: list[Choice], builder: ResponseBuilder,
                  include_usage: bool, tools: ToolCallExtractor | None) -> AsyncIterator[str]:
    """SSE events: chunks as tokens arrive (any choice's), then usage if asked, then [DONE]."""
    if builder.chat:
        for c in choices:
            first = builder.role_chunk(c.index)
            if include_usage:
                first["usage"] = None
            yield sse(first)
    offsets = {c.index: 0 for c in choices}
    kv_params = (lambda: choices[0].gen.kv_transfer_params) if len(choices) == 1 else (
        lambda: None)
    async with _abort_on_disconnect(request, cancel_all(choices)):
        try:
            async for c, delta in interleaved(choices):
                if tools is not None:  # one choice
                    for chunk in _tool_chunks(builder, tools, delta, include_usage):
                        yield sse(chunk)
                    continue
                yield sse(builder.chunk(delta, offsets[c.index], kv_params(), include_usage,
                                        c.index))
                offsets[c.index] += len(delta.text)
        except APIError as exc:  # the headers are sent: the error travels in the stream
            yield sse(exc.body())
            yield sse("[DONE]")
            return
    if include_usage:
        yield sse(builder.usage_chunk(usage(choices)))
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
