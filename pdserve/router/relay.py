"""Relaying SSE from an instance: D's chunks rewritten into the stream P opened, and the
error events that end a stream whose instance failed."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pdserve.router.registry import Instance
from pdserve.router.shaping import error_body, shift_logprobs, sse


@dataclass
class DecodeRelay:
    """Rewrites D's SSE lines into the client's stream that P's chunks opened."""

    request_id: str
    chat: bool
    text_offset: int  # the length of P's text: D's completions offsets start after it
    done: bool = False

    def event(self, line: str) -> str | None:
        if not line.startswith("data: "):
            return None
        data = line[len("data: "):]
        if data == "[DONE]":
            self.done = True
            return sse(data)
        try:
            chunk = json.loads(data)
        except ValueError:
            return line + "\n\n"  # not ours to judge: pass it on as it came
        if "error" in chunk:
            return sse(chunk)
        if self.chat and is_role_chunk(chunk):
            return None  # P's chunks already named the speaker
        chunk.pop("kv_transfer_params", None)  # internal: never a client's
        chunk["id"] = self.request_id
        if not self.chat:
            for choice in chunk.get("choices", []):
                choice["logprobs"] = shift_logprobs(choice.get("logprobs"), self.text_offset)
        return sse(chunk)


def is_role_chunk(chunk: dict) -> bool:
    choices = chunk.get("choices") or []
    if len(choices) != 1:
        return False
    delta = choices[0].get("delta") or {}
    return ("role" in delta and not delta.get("content")
            and choices[0].get("finish_reason") is None)


def error_from(content: bytes) -> dict:
    try:
        body = json.loads(content)
        if isinstance(body, dict) and "error" in body:
            return body
    except ValueError:
        pass
    return error_body(content.decode(errors="replace")[:500], code="decode_failed")


def stream_failed(inst: Instance, exc: Exception) -> list[str]:
    """The last events of a stream whose instance failed: an OpenAI error, then [DONE]. It
    names no instance URL (`Upstream.broken` logs it)."""
    message = (f"the {inst.role} instance failed while streaming this response "
               f"({type(exc).__name__}); the response is incomplete")
    return [sse(error_body(message, code="upstream_failed")), sse("[DONE]")]
