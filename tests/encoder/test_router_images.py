"""The router's side: a chat body's image parts in P's order, and encoders kept out of the
instances that serve requests."""

from __future__ import annotations

import pytest

from pdserve.router.encode import image_parts
from pdserve.router.registry import Registry


def test_image_parts_in_prompt_order_across_messages():
    body = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "b"}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "now"},
                                     {"type": "image_url",
                                      "image_url": {"url": "c", "detail": "low"}}]},
    ]}
    assert [p["url"] for p in image_parts(body)] == ["a", "b", "c"]
    assert image_parts({"messages": [{"role": "user", "content": "text"}]}) == []


def test_encoders_register_but_serve_no_request():
    registry = Registry()
    registry.register("http://e:1", "encoder").mark(True)
    assert not registry.can_serve()  # an encoder answers no request
    assert registry.engines() == [] and [i.url for i in registry.healthy("encoder")] == [
        "http://e:1"]
    registry.add_static("http://c:2", "colocated").mark(True)
    assert registry.can_serve() and [i.url for i in registry.engines()] == ["http://c:2"]
    with pytest.raises(ValueError, match="role must be one of"):
        registry.register("http://x:3", "vision")
