"""Tool calls in a model's text, in the formats of the families pdserve serves (vLLM's
parser names), and how a past call is written back into a prompt in the same format.

    hermes       Qwen 2.5/3, Hermes, SmolLM2:
                 <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (one per call)
    llama3_json  Llama 3.x: {"name": ..., "parameters": {...}}  (the whole reply; several: `;`)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Literal

ParserName = Literal["hermes", "llama3_json"]
PARSERS: tuple[ParserName, ...] = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parser_for_template(chat_template: str | None) -> ParserName:
    """The format a model family's template speaks: Llama 3's headers, else Hermes."""
    return "llama3_json" if "<|start_header_id|>" in str(chat_template or "") else "hermes"


def call_start(parser: ParserName, text: str) -> int | None:
    """Where a tool call begins in the text so far (None: no call yet). Llama 3 calls are
    the whole reply, so only a reply that opens with `{` is one."""
    if parser == "hermes":
        at = text.find(HERMES_OPEN)
        return None if at < 0 else at
    stripped = text.lstrip()
    return len(text) - len(stripped) if stripped.startswith("{") else None


def held_back(parser: ParserName, text: str) -> int:
    """How many trailing characters might still become the start of a call: not sent yet."""
    if parser == "llama3_json":
        return len(text) if not text.strip() else 0  # only leading whitespace waits
    for n in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
        if HERMES_OPEN.startswith(text[-n:]):
            return n
    return 0


def parse_calls(parser: ParserName, text: str, names: set[str]) -> list[ParsedCall] | None:
    """The calls in `text` (from `call_start` on), or None if it is not a valid call."""
    if parser == "hermes":
        bodies = [m.group(1) for m in _HERMES_CALL.finditer(text)]
        objects = [_loads(b) for b in bodies]
    else:
        objects = _json_sequence(text.strip())
    if not objects or any(o is None for o in objects):
        return None
    calls = [_call(o, names) for o in objects]
    return None if any(c is None for c in calls) else calls


def parse_call_array(text: str, names: set[str]) -> list[ParsedCall] | None:
    """The output of `tool_choice: "required"`: a JSON array of {"name", "arguments"}; cut
    short by max_tokens, the calls complete before the cut."""
    items = _loads(text)
    if items is None:
        items = _complete_items(text)
    if not isinstance(items, list) or not items:
        return None
    calls = [_call(o, names) for o in items]
    return None if any(c is None for c in calls) else calls


def render_calls(parser: ParserName, calls: list[dict]) -> str:
    """Past calls ({"name", "arguments"} with arguments as JSON) as the model writes them."""
    if parser == "hermes":
        return "\n".join(f"{HERMES_OPEN}\n{json.dumps(c)}\n{HERMES_CLOSE}" for c in calls)
    return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]})
                     for c in calls)


def _call(obj: object, names: set[str]) -> ParsedCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> object | None:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _complete_items(text: str) -> list[object]:
    """The complete values at the start of an unfinished JSON array."""
    decoder, out = json.JSONDecoder(), []
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        return out
    at += 1
    while True:
        at = len(text) - len(text[at:].lstrip())
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return out
        out.append(obj)
        rest = text[at:].lstrip()
        if not rest.startswith(","):
            return out
        at = len(text) - len(rest) + 1


def _json_sequence(text: str) -> list[object] | None:
    """JSON values separated by `;` (Llama 3's parallel calls)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        out.append(obj)
        rest = text[at:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        at = len(text) - len(rest)
    return out
