"""OpenAI-style error bodies, and the handlers that turn every bad input into a 4xx."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error to show the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict:
    """The JSON OpenAI clients expect on failure."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(
        f"The model `{name}` does not exist.", 404, param="model", code="model_not_found"
    )


def engine_dead() -> APIError:
    return APIError(
        "The engine process has died; this instance cannot serve requests.",
        503, type="server_error", code="engine_dead",
    )


def validation_error(errors: list[dict]) -> APIError:
    """A 400 naming the first field pydantic rejected, and why."""
    if not errors:
        return bad_request("Invalid request")
    # a value that fits none of a union's types: say what bound it broke, not "not a string";
    # else the branch that got deepest into the value (a content part, not "not a string")
    deepest = max(errors, key=lambda e: len(e.get("loc", ())))
    err = next((e for e in errors if not str(e.get("type")).endswith("_type")), deepest)
    if err.get("type") == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {err.get('ctx', {}).get('error')}")
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    text = f"{'.'.join(loc)}: {msg}{more}" if loc else f"{msg}{more}"
    return bad_request(text, loc[0] if loc else None)


def _is_union_tag(part: object) -> bool:
    """pydantic names a union's branch in `loc` ("str", "list[int]", "constrained-str")."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"}
                                      or any(c in part for c in "[-"))


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error(list(exc.errors()))
    return JSONResponse(err.body(), status_code=err.status_code)


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code)


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Last resort: a bug must still answer in the OpenAI shape, and the server lives on.
    return JSONResponse(
        error_body(f"Internal error: {type(exc).__name__}: {exc}", "server_error"), 500
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error path to an OpenAI-style body."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

