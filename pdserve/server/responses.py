"""OpenAI response bodies and stream chunks for completions and chat, built from deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.engine.outputs import TokenLogprob
from pdserve.server.generation import Delta


@dataclass
class ResponseBuilder:
    """Shapes deltas into either endpoint's JSON; one instance per request."""

    chat: bool
    request_id: str
    model: str
    tokenizer: object
    num_logprobs: int | None
    tokens_as_ids: bool = False
    token_ids: bool = False  # return_token_ids: each choice carries its tokens' ids
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _token_str(self, token_id: int) -> str:
        if self.tokens_as_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def logprobs(self, items: list[TokenLogprob], text_offset: int = 0) -> dict | None:
        """Logprobs of sampled tokens with their top alternatives, in the endpoint's format."""
        if self.num_logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(lp) for lp in items]}
        tokens = [self._token_str(lp.token_id) for lp in items]
        offsets, at = [], text_offset
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [
                {self._token_str(t): v for t, v in lp.top[: self.num_logprobs]} for lp in items
            ],
            "text_offset": offsets,
        }

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        def entry(token_id: int, value: float) -> dict:
            text = self._token_str(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        top = [entry(t, v) for t, v in lp.top[: self.num_logprobs]]
        return {**entry(lp.token_id, lp.logprob), "top_logprobs": top}

    def _choice(self, index: int, text: str, logprobs: dict | None, finish: str | None,
                stop_reason: str | int | None, streaming: bool) -> dict:
        choice: dict = {"index": index}
        if self.chat:
            key = "delta" if streaming else "message"
            choice[key] = {"content": text} if streaming else {"role": "assistant",
                                                              "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        choice["stop_reason"] = stop_reason
        return choice

    def _envelope(self, choices: list[dict], streaming: bool) -> dict:
        obj = self.object + (".chunk" if streaming and self.chat else "")
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.model, "choices": choices}

    def role_chunk(self, index: int = 0) -> dict:
        """A choice's first chat chunk: it names the speaker before any content."""
        body = self._envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}], True)
        return body

    def chunk(self, delta: Delta, text_offset: int, kv_transfer_params: dict | None,
              include_usage: bool, index: int = 0) -> dict:
        choice = self._choice(index, delta.text, self.logprobs(delta.logprobs, text_offset),
                              delta.finish_reason, delta.stop_reason, streaming=True)
        if self.token_ids:
            choice["token_ids"] = delta.token_ids
        body = self._envelope([choice], True)
        if include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        if delta.finish_reason is not None and kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        return body

    def tool_call_chunks(self, index: int, call: dict, include_usage: bool) -> list[dict]:
        """One tool call as OpenAI streams it: its id, type and name with empty arguments,
        then the arguments (clients concatenate `arguments` by `index`)."""
        fn = call["function"]
        head = {"index": index, "id": call["id"], "type": "function",
                "function": {"name": fn["name"], "arguments": ""}}
        tail = {"index": index, "function": {"arguments": fn["arguments"]}}
        chunks = []
        for part in (head, tail):
            body = self._envelope([{"index": 0, "delta": {"tool_calls": [part]},
                                    "logprobs": None, "finish_reason": None}], True)
            if include_usage:
                body["usage"] = None
            chunks.append(body)
        return chunks

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope([], True), "usage": usage}

    def full_choice(self, index: int, text: str, logprobs: list[TokenLogprob],
                    finish: str | None, stop_reason: str | int | None,
                    token_ids: list[int] | None = None,
                    tool_calls: list[dict] | None = None) -> dict:
        """One choice of the non-streaming body; a chat reply that called tools carries
        `tool_calls` (and content null if it said nothing else)."""
        choice = self._choice(index, text, self.logprobs(logprobs), finish, stop_reason,
                              streaming=False)
        if tool_calls:
            choice["message"]["tool_calls"] = tool_calls
            choice["message"]["content"] = text.strip() or None
        if self.token_ids:
            choice["token_ids"] = token_ids or []
        return choice

    def full(self, choices: list[dict], usage: dict, kv_transfer_params: dict | None) -> dict:
        """The non-streaming body of `full_choice`s."""
        body = {**self._envelope(choices, False), "usage": usage}
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        return body
