"""Every pdserve server (instance, router, encoder) runs uvicorn with httptools' C parser and
asyncio's own event loop, even where uvloop is installed (pdserve/uvicorn_config.py says why)."""

from __future__ import annotations

from pdserve.uvicorn_config import server_config


async def _app(scope, receive, send) -> None:
    pass


def test_servers_parse_http_with_httptools():
    config = server_config(_app, host="127.0.0.1", port=0)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"


def test_servers_run_on_asyncio_even_where_uvloop_is_installed():
    assert server_config(_app).get_loop_factory().__module__.startswith("asyncio")
