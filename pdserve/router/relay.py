"""Relaying SSE from an instance into the client's stream, keeping track of what the client
has (so that another instance can resume the answer), and the error events that end a
stream no instance could finish."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import orjson

from pdserve.router.registry import Instance
from pdserve.router.shaping import error_body, first_text, shift_logprobs, sse


class InstanceFailed(Exception):
    """The instance reported in its stream that it failed (its engine died)."""


@dataclass
class Progress:
    """What the client has of one streamed answer: enough to resume it elsewhere."""

    token_ids: list[int] = field(default_factory=list)  # output tokens whose text it has
    text_chars: int = 0  # characters of output text it has
    response_id: str | None = None  # the answer's id and created time, from its first chunk
    created: int | None = None
    role_sent: bool = False  # chat: the chunk naming the speaker went out
    finished: bool = False  # a finish_reason went out: only usage and [DONE] can be missing
    done: bool = False  # [DONE] went out
    tracked: bool = True  # every chunk carried its token ids (else it cannot be resumed)
    num_choices: int = 1  # n x prompts: more than one is never resumed (untracked)
    num_finished: int = 0  # choices whose finish_reason went out

    @classmethod
    def after_prefill(cls, answer: dict, chat: bool, first_token_id: object) -> Progress:
        """The client has P's token (sent as the stream's first chunks)."""
        ok = isinstance(first_token_id, int)
        return cls(token_ids=[first_token_id] if ok else [],
                   text_chars=len(first_text(answer, chat)), response_id=answer["id"],
                   created=answer.get("created"), role_sent=chat, tracked=ok)


@dataclass
class StreamRelay:
    """Rewrites one instance's SSE lines into the client's stream: the answer's id and
    created time throughout, one role chunk, completions logprobs offsets counted from the
    start of the answer; the token ids the router asked for are read and (unless the client
    asked for them too) removed."""

    chat: bool
    progress: Progress
    keep_token_ids: bool = False
    text_offset: int = field(init=False)  # the client's text before this instance's part

    def __post_init__(self) -> None:
        self.text_offset = self.progress.text_chars

    def event(self, line: str) -> str | None:
        """The event to send for one line, or None; raises InstanceFailed for a server
        error that the instance reports in its stream."""
        if not line.startswith("data: "):
            return None
        data = line[len("data: "):]
        if data == "[DONE]":
            self.progress.done = True
            return sse(data)
        try:
            chunk = orjson.loads(data)
        except ValueError:
            return line + "\n\n"  # not ours to judge: pass it on as it came
        if not isinstance(chunk, dict):
            return line + "\n\n"
        if "error" in chunk:
            error = chunk["error"]
            if isinstance(error, dict) and error.get("type") == "server_error":
                raise InstanceFailed(str(error.get("message")))
            return sse(chunk)
        if self.chat and is_role_chunk(chunk) and chunk["choices"][0].get("index", 0) == 0:
            if self.progress.role_sent:
                return None  # the client knows the speaker already
            self.progress.role_sent = True
        chunk.pop("kv_transfer_params", None)  # internal: never a client's
        self._track(chunk)
        p = self.progress
        if p.response_id is None:
            p.response_id, p.created = chunk.get("id"), chunk.get("created")
        else:
            chunk["id"], chunk["created"] = p.response_id, p.created
        return sse(chunk)

    def _track(self, chunk: dict) -> None:
        for choice in chunk.get("choices") or []:
            ids = choice.get("token_ids") if self.keep_token_ids else choice.pop("token_ids",
                                                                                 None)
            text = ((choice.get("delta") or {}).get("content") if self.chat
                    else choice.get("text")) or ""
            if isinstance(ids, list):
                self.progress.token_ids += ids
            elif text or choice.get("finish_reason") is not None:
                self.progress.tracked = False  # an instance that does not send them
            self.progress.text_chars += len(text)
            if choice.get("finish_reason") is not None:
                self.progress.num_finished += 1
                self.progress.finished = self.progress.num_finished >= self.progress.num_choices
            if not self.chat:
                choice["logprobs"] = shift_logprobs(choice.get("logprobs"), self.text_offset)


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


def not_resumed(why: str) -> list[str]:
    """The last events of a stream that no other instance could take over."""
    message = f"the response is incomplete: {why}"
    return [sse(error_body(message, code="upstream_failed")), sse("[DONE]")]
