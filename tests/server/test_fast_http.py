"""pdserve's servers (instance, router, encoder) build a default `uvicorn.Config`; with the
uvloop and httptools dependencies installed, uvicorn serves them on uvloop's event loop and
httptools' parser, not asyncio's loop and h11 (a third less CPU a streamed token)."""

from __future__ import annotations

import sys

import pytest
from uvicorn.config import Config


async def _app(scope, receive, send) -> None:
    pass


def test_default_config_serves_with_httptools():
    config = Config(_app)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_default_config_runs_on_uvloop():
    assert Config(_app).get_loop_factory().__module__.startswith("uvloop")
