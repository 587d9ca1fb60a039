"""The uvicorn settings every pdserve server (instance, router, encoder) shares."""

from __future__ import annotations

from typing import Any

import uvicorn

# asyncio's loop, not uvloop even where it is installed: under uvloop a closed connection's
# transport drops its socket, and httpx (through anyio) then raises AttributeError instead of
# a connection error when its peer dies mid-request (a 500 from the router in
# tests/router/test_faults.py's killed-prefill run, when the router's client was httpx;
# heartbeats and launchers still use httpx)
LOOP = "asyncio"
HTTP = "httptools"  # the C parser, a dependency: at 64 streams 39 us of CPU a token, h11 52


def server_config(app: Any, **settings: Any) -> uvicorn.Config:
    """uvicorn.Config for `app` with pdserve's loop and HTTP parser, and `settings`."""
    return uvicorn.Config(app, loop=LOOP, http=HTTP, **settings)
