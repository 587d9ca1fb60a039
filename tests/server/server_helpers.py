"""Small helpers shared by the server tests (request shortcuts and assertions)."""

from __future__ import annotations

import json
import re

import httpx

GREEDY = {"temperature": 0.0}
MAX_NUM_SEQS = 4  # the shared server's --max-num-seqs: small, so overload is cheap


def complete(client: httpx.Client, prompt, **fields) -> dict:
    """A non-streaming completion that must succeed."""
    resp = client.post("/v1/completions", json={"prompt": prompt, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat(client: httpx.Client, content: str, **fields) -> dict:
    """A non-streaming one-turn chat that must succeed."""
    messages = [{"role": "user", "content": content}]
    resp = client.post("/v1/chat/completions", json={"messages": messages, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream_events(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    """POST with stream=true; the parsed `data:` events, "[DONE]" kept as a string."""
    events: list[dict | str] = []
    with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of the first /metrics sample called `name` that carries `labels`."""
    for line in client.get("/metrics").text.splitlines():
        m = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(f"{name} {labels}")


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> None:
    """The response is an OpenAI-style error body with this status."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param


def assert_still_serves(client: httpx.Client) -> None:
    """A normal request right after a bad one succeeds."""
    out = complete(client, "The capital of France is", max_tokens=2, **GREEDY)
    assert out["usage"]["completion_tokens"] == 2
