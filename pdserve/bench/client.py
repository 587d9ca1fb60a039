"""The HTTP client: sends one OpenAI-style request and timestamps every streamed chunk."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pdserve.bench.request import RequestRecord, RequestSpec


@dataclass
class EndpointConfig:
    """Where and how to send: an OpenAI-compatible completions or chat endpoint."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    stream: bool = True
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 6 * 3600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint


def build_payload(cfg: EndpointConfig, spec: RequestSpec) -> dict[str, Any]:
    """The JSON body for `spec`, in the shape vLLM's and SGLang's benchmarks send."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": spec.output_len,
        "temperature": cfg.temperature,
        "stream": cfg.stream,
    }
    if cfg.chat and spec.images:  # image parts first, then the text (SGLang's order)
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in spec.images]
        body["messages"] = [{"role": "user", "content": [
            *parts, {"type": "text", "text": spec.prompt}]}]
    elif spec.images:
        raise ValueError("image workloads need the chat endpoint: --endpoint "
                         "/v1/chat/completions")
    elif cfg.chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _choice_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta") or choice.get("message") or {}
    return (part.get("content") or "") + (part.get("reasoning_content") or "")


def _take_usage(rec: RequestRecord, data: dict[str, Any]) -> None:
    usage = data.get("usage")
    if usage:
        rec.usage_prompt_tokens = usage.get("prompt_tokens")
        rec.usage_completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            rec.usage_cached_tokens = details["cached_tokens"]


class _SSEReader:
    """Splits a byte stream into `data:` payloads; one timestamp per network read."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        if b"\r" in self.buf:  # CRLF servers; a pair split across reads joins in the buffer
            self.buf = self.buf.replace(b"\r\n", b"\n")
        *events, self.buf = self.buf.split(b"\n\n")
        out = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].strip())
        return out


async def _read_stream(
    resp: aiohttp.ClientResponse, rec: RequestRecord, chat: bool, t0: float
) -> None:
    reader = _SSEReader()
    texts: list[str] = []
    async for data in resp.content.iter_any():
        now = time.monotonic() - t0
        for payload in reader.feed(data):
            if payload == b"[DONE]":
                continue
            msg = json.loads(payload)
            if "error" in msg:
                rec.error = f"stream error: {_short(msg['error'])}"
                continue
            choices = msg.get("choices") or []
            text = _choice_text(choices[0], chat) if choices else ""
            if text:  # a chunk counts as a token arrival only when it carries text
                rec.chunk_s.append(now)
                texts.append(text)
            _take_usage(rec, msg)
    rec.output_text = "".join(texts)


def _short(err: Any) -> str:
    if isinstance(err, dict):
        err = err.get("message", err)
    return str(err)[:200]


async def send_request(
    session: aiohttp.ClientSession,
    cfg: EndpointConfig,
    spec: RequestSpec,
    rec: RequestRecord,
    t0: float,
) -> RequestRecord:
    """Send `spec`, filling `rec` (times relative to monotonic `t0`); never raises."""
    body = build_payload(cfg, spec)
    rec.streamed = cfg.stream
    rec.send_s = time.monotonic() - t0
    try:
        async with session.post(cfg.url, json=body, headers=cfg.headers) as resp:
            if resp.status != 200:
                text = await resp.text()
                rec.error = f"HTTP {resp.status}: {text.strip()[:200]}"
            elif cfg.stream:
                await _read_stream(resp, rec, cfg.chat, t0)
            else:
                data = await resp.json(content_type=None)
                if "error" in data:
                    rec.error = f"response error: {_short(data['error'])}"
                choices = data.get("choices") or []
                rec.output_text = _choice_text(choices[0], cfg.chat) if choices else ""
                _take_usage(rec, data)
    except asyncio.CancelledError:
        rec.cancelled = True  # the runner stopped the stage; not a server failure
    except Exception as exc:  # every failure is recorded, none escapes
        rec.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    rec.end_s = time.monotonic() - t0
    return rec


def new_session(limit: int = 0, timeout_s: float = 6 * 3600.0) -> aiohttp.ClientSession:
    """A pooled session; limit=0 means no cap on open connections (the runner caps)."""
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        read_bufsize=2**16,
    )


async def fetch_model_id(base_url: str, headers: dict[str, str] | None = None) -> str:
    """The first model the server lists at /v1/models (used when --model is not given)."""
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
    return data["data"][0]["id"]
