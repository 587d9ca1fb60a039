"""Tools and past tool calls into the chat template's conversation.

A template that knows tools (Qwen 2.5, Llama 3.1, ...: it names `tools`) gets them as
`tools=` and the assistant's calls as `tool_calls`. One that does not (the embedded
SmolLM2's) would drop them silently: the tools are then described in a system instruction,
and past calls written into the assistant's text in the parser's format.
"""

from __future__ import annotations

import json

from pdserve.server.tool_parsers import ParserName, render_calls

HERMES_INSTRUCTION = (
    "You may call functions to answer. The functions you may call, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a JSON object of its name and arguments inside "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<its arguments>}}}}\n'
    "</tool_call>")
LLAMA3_INSTRUCTION = (
    "You may call functions to answer. The functions you may call, as JSON schemas:\n"
    "{tools}\n"
    "To call a function, reply with nothing but a JSON object "
    '{{"name": "<function name>", "parameters": {{<its arguments>}}}}.')


def template_takes_tools(chat_template: str | None) -> bool:
    return "tools" in str(chat_template or "")  # a dict of named templates too


def tool_instruction(tools: list[dict], parser: ParserName) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    form = HERMES_INSTRUCTION if parser == "hermes" else LLAMA3_INSTRUCTION
    return form.format(tools=listing)


def conversation(messages, tools: list[dict] | None, parser: ParserName,
                 native: bool) -> list[dict]:
    """The messages as the template takes them; `native`: the template renders tools."""
    turns = [_turn(m, parser, native) for m in messages]
    if tools and not native:
        instruction = tool_instruction(tools, parser)
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{instruction}"}
        else:
            turns.insert(0, {"role": "system", "content": instruction})
    return turns


def _turn(message, parser: ParserName, native: bool) -> dict:
    turn = {"role": message.role, "content": message.text()}
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        turn["name"] = message.name
    if not message.tool_calls:
        return turn
    calls = [{"name": c.function.name, "arguments": c.arguments_object()}
             for c in message.tool_calls]
    if native:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                              for c, call in zip(message.tool_calls, calls)]
    else:
        text = render_calls(parser, calls)
        turn["content"] = f"{turn['content']}\n{text}" if turn["content"] else text
    return turn
