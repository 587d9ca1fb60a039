"""Incremental detokenization: text deltas that are whole characters and never pass a stop string.

Decoding token by token breaks multi-byte characters (an emoji spans several byte-level
tokens) and word-initial spaces (SentencePiece); so, like vLLM, each step decodes a small
window of recent tokens and releases only the text past the window's already-read part,
holding back while the window ends in an incomplete character (U+FFFD). Stop strings are
searched in the released text; text that could still become a stop string is held back.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for correct spacing


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's sampled tokens, one at a time, into text deltas that are safe to send."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0  # window start: tokens decoded only for context
        self._read_offset = len(context)  # tokens before this have been turned into text
        self._stop = [s for s in (stop or []) if s]
        self._include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all decoded output text (cut at a stop string)
        self._sent = 0  # chars of self.text already released
        self.stopped_by: str | None = None  # the stop string that ended the request

    def add_token(self, token_id: int) -> str:
        """Feed one sampled token; return the text that may now be sent (maybe empty)."""
        if self.stopped_by is not None:
            return self._release(final=True)  # "" unless resume() left some text unsent
        self._ids.append(token_id)
        new_text = self._decode_new()
        if new_text:
            self._append_and_check_stop(new_text)
        return self._release(final=self.stopped_by is not None)

    def resume(self, token_ids: list[int], sent_chars: int) -> None:
        """Continue output that another instance began: its tokens are decoded as if they
        were sampled here (so a stop string spanning the break still stops), and the first
        `sent_chars` characters of their text count as released: the client has them."""
        for token_id in token_ids:
            self.add_token(token_id)
        self._sent = min(sent_chars, len(self.text))

    def flush(self) -> str:
        """At the end of the request: release everything held back (an incomplete tail too)."""
        if self.stopped_by is None and self._read_offset < len(self._ids):
            tail = self._decode(self._ids[self._prefix_offset :])
            head = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._read_offset = len(self._ids)
            if len(tail) > len(head):
                self._append_and_check_stop(tail[len(head) :])
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self) -> str:
        window = self._ids[self._prefix_offset :]
        read = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(window)
        if len(full) <= len(read) or full.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new, or a character still incomplete: wait for more tokens
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(read) :]

    def _append_and_check_stop(self, new_text: str) -> None:
        start = max(0, len(self.text) - self._holdback)  # a stop may straddle the boundary
        self.text += new_text
        for stop in self._stop:
            at = self.text.find(stop, start)
            if at != -1 and (self.stopped_by is None or at < self._stop_at):
                self.stopped_by, self._stop_at = stop, at
        if self.stopped_by is not None:
            end = self._stop_at + (len(self.stopped_by) if self._include_stop else 0)
            self.text = self.text[:end]

    def _release(self, final: bool) -> str:
        limit = len(self.text) if final else max(self._sent, len(self.text) - self._holdback)
        out = self.text[self._sent : limit]
        self._sent = limit
        return out
