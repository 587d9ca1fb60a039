"""Pure functions on OpenAI bodies: the P and D requests, and P's token as stream chunks."""

from __future__ import annotations

import json
import time

from pdserve.event_stream import sse


def error_body(message: str, type: str = "server_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error format, as the instances use it too."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def is_chat(path: str) -> bool:
    return path.endswith("/chat/completions")


def calls_tools(body: dict) -> bool:
    """A chat request whose reply may be tool calls: its text is parsed whole, so P's
    first token is not streamed on its own as content."""
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return bool(body.get("stream") and isinstance(opts, dict) and opts.get("include_usage"))


def prefill_body(body: dict, chat: bool = False) -> dict:
    """What P gets: the client's request cut to one token, not streamed, KV kept for D;
    with the client's max_tokens as `decode_max_tokens`, so that P refuses (before the
    router starts a stream) what D would refuse for the context's length."""
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    out.pop("max_completion_tokens", None)
    wanted = body.get("max_completion_tokens") if chat else None
    wanted = body.get("max_tokens") if wanted is None else wanted
    if wanted is not None:
        out["decode_max_tokens"] = wanted
    if isinstance(body.get("min_tokens"), int):  # D enforces the rest; P's one token is 1
        out["min_tokens"] = min(body["min_tokens"], 1)
    return out


def decode_body(body: dict, kv_transfer_params: dict) -> dict:
    """What D gets: the client's request as sent, plus where P holds the prompt's KV; D
    answers with the whole completion (P's first token first), as vLLM's D does."""
    # P pulled the images' rows (ending their leases); a D that prefills encodes them
    out = {k: v for k, v in body.items() if k != "encoder_handles"}
    return {**out, "kv_transfer_params": kv_transfer_params}


def tracked_body(body: dict) -> dict:
    """A streamed request whose chunks carry their token ids, for the router to resume."""
    return {**body, "return_token_ids": True}


def resume_body(body: dict, token_ids: list[int], text_chars: int) -> dict:
    """The client's request for another instance that continues its answer after the
    `token_ids` the client has (whose text is `text_chars` characters long)."""
    # the images' leases were P's to read: the instance taking over encodes them
    out = {k: v for k, v in body.items() if k not in ("kv_transfer_params", "encoder_handles")}
    out.update(stream=True, return_token_ids=True)
    if token_ids:  # none yet: the answer simply starts again there
        out["resume"] = {"token_ids": token_ids, "text_chars": text_chars}
    return out


def first_text(answer: dict, chat: bool) -> str:
    choice = answer["choices"][0]
    return (choice["message"].get("content") or "") if chat else choice["text"]


def _chunk(answer: dict, chat: bool, choice: dict, include_usage: bool) -> dict:
    body = {"id": answer["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer.get("created", int(time.time())), "model": answer.get("model"),
            "choices": [choice]}
    if include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def first_chunks(answer: dict, chat: bool, include_usage: bool, finished: bool = False
                 ) -> list[dict]:
    """P's answer as the stream's opening chunks (chat: the role, then the content)."""
    choice = answer["choices"][0]
    finish = choice.get("finish_reason") if finished else None
    stop = choice.get("stop_reason") if finished else None
    text = first_text(answer, chat)
    chunks = []
    if chat:
        chunks.append(_chunk(answer, chat, {"index": 0, "delta": {"role": "assistant",
                      "content": ""}, "logprobs": None, "finish_reason": None}, include_usage))
        content = {"index": 0, "delta": {"content": text}}
    else:
        content = {"index": 0, "text": text}
    content.update(logprobs=choice.get("logprobs"), finish_reason=finish, stop_reason=stop)
    if "token_ids" in choice:  # the client asked for them (return_token_ids)
        content["token_ids"] = choice["token_ids"]
    chunks.append(_chunk(answer, chat, content, include_usage))
    return chunks


def answer_as_stream(answer: dict, chat: bool, include_usage: bool) -> list[str]:
    """A whole (non-streamed) answer replayed as SSE events, [DONE] included."""
    events = [sse(c) for c in first_chunks(answer, chat, include_usage, finished=True)]
    if include_usage:
        usage = {"id": answer["id"], "object": "chat.completion.chunk" if chat
                 else "text_completion", "created": answer.get("created"),
                 "model": answer.get("model"), "choices": [], "usage": answer.get("usage")}
        events.append(sse(usage))
    events.append(sse("[DONE]"))
    return events


def without_kv_params(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "kv_transfer_params"}


def strip_kv_params(content: bytes) -> bytes:
    """An instance's JSON answer without `kv_transfer_params` (internal: never a client's)."""
    if b"kv_transfer_params" not in content:
        return content
    try:
        answer = json.loads(content)
    except ValueError:
        return content
    if not isinstance(answer, dict):
        return content
    return json.dumps(without_kv_params(answer)).encode()


def shift_logprobs(logprobs: dict | None, by: int) -> dict | None:
    """Completions logprobs of D's part, with text offsets counted from P's text."""
    if not logprobs or "text_offset" not in logprobs or not by:
        return logprobs
    return {**logprobs, "text_offset": [o + by for o in logprobs["text_offset"]]}
