"""Tool calls out of a generated reply, as it streams or whole.

With `tool_choice: "auto"` the reply is free text: content is sent as it comes until a call
may begin (a Hermes `<tool_call>`, or a Llama 3 reply opening with `{`); from there the text
is held, and parsed at the end: calls if it is a valid call, else content after all. With
"required" or a named function the grammar made the whole reply a call: it is held and
parsed at the end, where it cannot fail (unless max_tokens cut it short).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pdserve.server.tool_parsers import (
    ParsedCall,
    ParserName,
    call_start,
    held_back,
    parse_call_array,
    parse_calls,
)
from pdserve.server.tool_protocol import ToolMode


@dataclass
class ToolCallExtractor:
    """One reply's text in, content to send and (at the end) its tool calls out."""

    mode: ToolMode  # "auto", "required" or "named"
    parser: ParserName
    names: set[str]
    named: str | None = None
    _text: str = ""  # the reply so far
    _sent: int = 0  # characters of it sent as content
    _call_at: int | None = None  # where a call began (auto)
    calls: list[ParsedCall] = field(default_factory=list)

    def feed(self, text: str) -> str:
        """Take the next piece of the reply; return the content safe to send now."""
        self._text += text
        if self.mode != "auto" or self._call_at is not None:
            return ""
        at = call_start(self.parser, self._text)
        if at is not None:
            self._call_at = at
            upto = at if self._text[self._sent:at].strip() else self._sent  # no bare blanks
        else:
            upto = len(self._text) - held_back(self.parser, self._text)
        out = self._text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return out

    def finish(self) -> str:
        """The reply ended: parse the held text into `calls`; return what is left to send
        as content (all of the held text, if it was no valid call)."""
        held = self._text[self._sent:]
        calls = None
        if self.mode == "named":
            calls = _named_call(self.named, held)
        elif self.mode == "required":
            calls = parse_call_array(held, self.names)
        elif self._call_at is not None:
            calls = parse_calls(self.parser, held, self.names)
        self._sent = len(self._text)
        if not calls:
            return held
        self.calls = calls
        return ""

    def finish_reason(self, reason: str | None) -> str | None:
        """"tool_calls" for a reply that called; "length" stays: its last call was cut off."""
        return "tool_calls" if self.calls and reason != "length" else reason


def _named_call(name: str, text: str) -> list[ParsedCall] | None:
    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [ParsedCall(name, text)] if isinstance(args, dict) else None
