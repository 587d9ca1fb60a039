"""The router reads instances' streams line by line with its own splitter over aiohttp
(pdserve/router/upstream.py): lines cut across chunks, CRLF ends, lines far over aiohttp's
128 KiB readline limit, and a stream that breaks mid-body, from a stdlib HTTP server that
writes chunked bodies exactly as told."""

from __future__ import annotations

import asyncio
import socket
from http.server import BaseHTTPRequestHandler

import pytest

from pdserve.router import upstream
from pdserve.router.upstream import StreamBroken, lines, new_session
from tests.router.stub_http import serve_on_loopback

LONG = "x" * (1 << 20)  # one 1 MiB line: an echoed prompt, say
# each write is one HTTP chunk: the splitter must join what the chunks cut
CHUNKS = [b"data: one\n\ndata: t", b"wo\r\n\r\n", f"data: {LONG}\n".encode(), b"\n",
          b"data: [DONE]\n\ntail without an end"]


class ChunkedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for chunk in CHUNKS:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        if self.path == "/broken":
            self.close_connection = True  # no terminating chunk: the instance died mid-answer
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def url():
    server, url = serve_on_loopback(ChunkedHandler)
    yield url
    server.shutdown()


async def read_lines(url: str) -> tuple[list[str], BaseException | None]:
    got: list[str] = []
    async with new_session() as session, session.get(url) as resp:
        try:
            async for line in lines(resp):
                got.append(line)
        except StreamBroken as exc:
            return got, exc
    return got, None


def test_lines_are_joined_across_chunks_and_freed_of_their_ends(url):
    got, error = asyncio.run(read_lines(url + "/whole"))
    assert error is None
    assert got == ["data: one", "", "data: two", "", f"data: {LONG}", "", "data: [DONE]", "",
                   "tail without an end"]


def test_a_stream_cut_mid_body_raises_stream_broken_after_the_lines_it_had(url):
    got, error = asyncio.run(read_lines(url + "/broken"))
    assert isinstance(error, StreamBroken)
    assert got[:7] == ["data: one", "", "data: two", "", f"data: {LONG}", "", "data: [DONE]"]


def test_a_line_over_the_bound_breaks_the_stream(url, monkeypatch):
    monkeypatch.setattr(upstream, "MAX_LINE_BYTES", 64 << 10)
    got, error = asyncio.run(read_lines(url + "/whole"))
    assert isinstance(error, StreamBroken)
    assert got == ["data: one", "", "data: two", ""]  # the 1 MiB line never came out
