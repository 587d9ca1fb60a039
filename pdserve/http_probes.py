"""/version and /ping, the same on the router and on an instance (vLLM's names for them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from pdserve import __version__


def add_probe_routes(app: FastAPI, health: Callable[[Request], Awaitable[Response]]) -> None:
    """GET /version, and GET|POST /ping answering as `health` (/health) does."""

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping(request: Request) -> Response:
        """/health under vLLM's (and SageMaker's) name: 200 while it serves."""
        return await health(request)
