"""An SSE response that runs a cleanup however it ends: finished, broken, or its client gone
before the first byte (which never starts the body iterator, so the body's own `finally`
would not run). The server aborts a generation with it; the router gives P's KV back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import orjson
from fastapi.responses import StreamingResponse


def sse(data: dict | str) -> str:
    """One server-sent event; orjson, as every streamed token is encoded (and, through the
    router, decoded and encoded again): about 5x less CPU than the json module."""
    return f"data: {data if isinstance(data, str) else orjson.dumps(data).decode()}\n\n"


class EventStream(StreamingResponse):
    """`text/event-stream` of `events`; `on_close()` once the response is over, whatever
    happened (it must be idempotent: it also runs after a normal end)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
