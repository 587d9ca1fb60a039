"""The router refuses a bad request itself, before any instance sees it, with the 400 an
instance would give: it validates with the instances' own pydantic models.

What only an instance can judge (the prompt's length in tokens against its context, the
model name) is left to it; the router still forwards the client's body as it came.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from pdserve import http_limits
from pdserve.server.errors import validation_error
from pdserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


async def read_request(request: Request, path: str) -> dict | Response:
    """The client's body as a dict, or the 4xx response (OpenAI's shape) refusing it.
    A large body is parsed and validated off the event loop."""
    try:
        raw = await request.body()  # bounded by http_limits.BodyLimit
    except http_limits.BodyError as exc:
        return JSONResponse(exc.body(), exc.status_code)
    if len(raw) > http_limits.PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(check_body, raw, path)
    return check_body(raw, path)


def check_body(raw: bytes, path: str) -> dict | Response:
    """Parse and validate `raw` as a request to `path` (a key of MODELS)."""
    try:
        body = http_limits.parse_json_object(raw)
    except http_limits.BodyError as exc:
        return JSONResponse(exc.body(), exc.status_code)
    model = MODELS.get(path, CompletionRequest)
    try:
        model.model_validate(body)
    except ValidationError as exc:
        err = validation_error(exc.errors())
        return JSONResponse(err.body(), err.status_code)
    return body
