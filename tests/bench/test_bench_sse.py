"""The SSE splitter: events may arrive split, merged, or with CRLF line ends."""

from __future__ import annotations

from pdserve.bench.client import EndpointConfig, _SSEReader, build_payload
from pdserve.bench.request import RequestSpec


def test_events_split_across_reads_are_joined():
    r = _SSEReader()
    assert r.feed(b'data: {"a"') == []
    assert r.feed(b": 1}\n") == []
    assert r.feed(b"\ndata: [DONE]\n\n") == [b'{"a": 1}', b"[DONE]"]


def test_crlf_line_ends_even_when_split():
    r = _SSEReader()
    assert r.feed(b"data: x\r\n\r") == []
    assert r.feed(b"\n") == [b"x"]


def test_comments_and_other_fields_are_ignored():
    r = _SSEReader()
    assert r.feed(b": ping\n\nevent: message\ndata: y\n\n") == [b"y"]


def test_payload_shapes():
    spec = RequestSpec("hello", 1, 9)
    comp = build_payload(EndpointConfig("http://x", model="m", extra_body={"top_k": 5}), spec)
    assert comp["prompt"] == "hello" and comp["max_tokens"] == 9 and comp["top_k"] == 5
    chat = build_payload(
        EndpointConfig("http://x", "/v1/chat/completions", "m", stream=False), spec
    )
    assert chat["messages"] == [{"role": "user", "content": "hello"}]
    assert "stream_options" not in chat and "ignore_eos" not in chat
