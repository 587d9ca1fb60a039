"""A scripted OpenAI-compatible server on loopback: every token's time is known in advance.

A request whose prompt (or last chat message) is a script name gets that script; any other
request gets `max_tokens` one-word chunks with no delay (a trivial server).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Script:
    """What the server does for one request: sleep `ttft`, send a chunk, sleep each gap..."""

    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # before chunks 2..n
    texts: list[str] | None = None  # chunk texts (default "t0 ", "t1 ", ...)
    completion_tokens: int | None = None  # usage; default = number of chunks
    prompt_tokens: int = 7
    status: int = 200
    empty_after_s: float | None = None  # no chunks at all: finish after this many seconds
    error_after_chunks: int | None = None  # send an error event after this many chunks
    send_usage: bool = True

    def n_chunks(self) -> int:
        return 0 if self.empty_after_s is not None else 1 + len(self.gaps)


def _chunk(text: str, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": None}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    return {"id": "x", "object": "chunk", "choices": [choice]}


class FakeServer:
    """Runs the app in a thread with its own event loop; `url` is its base URL."""

    def __init__(
        self,
        scripts: dict[str, Script] | None = None,
        max_concurrent: int | None = None,
        token_s: float = 0.0,
    ) -> None:
        self.scripts = scripts or {}
        self.token_s = token_s  # unscripted requests: seconds per token
        self.max_concurrent = max_concurrent  # a server that saturates: queue the rest
        self.bodies: list[dict] = []
        self._slots: asyncio.Semaphore | None = None
        self.loop = asyncio.new_event_loop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        cleanup = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        cleanup.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        runner = self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port, backlog=1024)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.max_concurrent is None:
            return await self._respond(request)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        async with self._slots:
            return await self._respond(request)

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        chat = "messages" in body
        key = body["messages"][-1]["content"] if chat else body["prompt"]
        script = self.scripts.get(key) or Script(
            ttft=self.token_s, gaps=[self.token_s] * (body["max_tokens"] - 1)
        )
        if script.status != 200:
            return web.json_response(
                {"error": {"message": "scripted failure"}}, status=script.status
            )
        n = script.n_chunks()
        texts = script.texts or [f"t{i} " for i in range(n)]
        usage = {
            "prompt_tokens": script.prompt_tokens,
            "completion_tokens": script.completion_tokens
            if script.completion_tokens is not None
            else n,
        }
        if not body.get("stream"):
            await asyncio.sleep((script.empty_after_s or 0) + script.ttft + sum(script.gaps))
            choice = {"index": 0, "finish_reason": "length"}
            text = "".join(texts[:n])
            choice.update(
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            return web.json_response({"choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await resp.write(f"data: {data}\n\n".encode())

        if chat:  # a role-only first chunk, as real servers send: must not count as a token
            await send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        if script.empty_after_s is not None:
            await asyncio.sleep(script.empty_after_s)
        delays = [script.ttft, *script.gaps][:n]
        for i, delay in enumerate(delays):
            if delay:
                await asyncio.sleep(delay)
            if script.error_after_chunks is not None and i == script.error_after_chunks:
                await send({"error": {"message": "scripted stream error"}})
                break
            await send(_chunk(texts[i], chat))
        if script.send_usage and body.get("stream_options", {}).get("include_usage"):
            await send({"choices": [], "usage": usage})
        await send("[DONE]")
        await resp.write_eof()
        return resp
