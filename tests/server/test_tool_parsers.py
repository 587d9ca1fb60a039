"""The tool-call parsers and the streaming extractor on model-like replies: content is sent
until a call may begin, and the held text becomes calls only if it is a valid one."""

from __future__ import annotations

import json

from pdserve.server.tool_calls import ToolCallExtractor
from pdserve.server.tool_parsers import parse_call_array, parse_calls, parser_for_template

NAMES = {"get_weather", "get_time"}


def _stream(extractor: ToolCallExtractor, text: str, piece: int = 3) -> str:
    """Feed `text` a few characters at a time; everything sent as content."""
    sent = "".join(extractor.feed(text[i:i + piece]) for i in range(0, len(text), piece))
    return sent + extractor.finish()


def test_hermes_call_after_text_is_split_at_the_tag():
    text = ('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>')
    ex = ToolCallExtractor("auto", "hermes", NAMES)
    assert _stream(ex, text) == "Sure. "
    assert [(c.name, json.loads(c.arguments)) for c in ex.calls] == [
        ("get_weather", {"city": "Paris"})]
    assert ex.finish_reason("stop") == "tool_calls"


def test_hermes_parallel_calls():
    text = ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    calls = parse_calls("hermes", text, NAMES)
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_text_that_only_looks_like_a_tag_is_sent_whole():
    ex = ToolCallExtractor("auto", "hermes", NAMES)
    assert _stream(ex, "a <tool is not <tool_call> a call") == \
        "a <tool is not <tool_call> a call"
    assert not ex.calls and ex.finish_reason("stop") == "stop"


def test_a_call_of_an_unknown_function_is_content():
    text = '<tool_call>{"name": "launch", "arguments": {}}</tool_call>'
    ex = ToolCallExtractor("auto", "hermes", NAMES)
    assert _stream(ex, text) == text and not ex.calls


def test_llama3_json_reply_is_a_call_and_prose_is_not():
    text = ' {"name": "get_time", "parameters": {"zone": "CET"}}; ' \
           '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    ex = ToolCallExtractor("auto", "llama3_json", NAMES)
    assert _stream(ex, text) == ""
    assert [c.name for c in ex.calls] == ["get_time", "get_weather"]
    prose = ToolCallExtractor("auto", "llama3_json", NAMES)
    assert _stream(prose, "It is {sunny}.") == "It is {sunny}." and not prose.calls


def test_required_array_cut_by_max_tokens_keeps_the_complete_calls():
    text = ('[{"name": "get_time", "arguments": {"zone": "UTC"}}, '
            '{"name": "get_weather", "argum')
    assert [c.name for c in parse_call_array(text, NAMES)] == ["get_time"]
    ex = ToolCallExtractor("required", "hermes", NAMES)
    assert _stream(ex, text) == "" and ex.finish_reason("length") == "length"


def test_named_reply_is_the_arguments():
    ex = ToolCallExtractor("named", "hermes", NAMES, named="get_time")
    assert _stream(ex, '{"zone": "UTC"}') == ""
    assert [(c.name, c.arguments) for c in ex.calls] == [("get_time", '{"zone": "UTC"}')]


def test_parser_follows_the_template_family():
    assert parser_for_template("<|start_header_id|>user<|end_header_id|>") == "llama3_json"
    assert parser_for_template("<|im_start|>user") == "hermes"


NATIVE_TEMPLATE = (
    "{% for t in tools %}TOOL {{ t.function.name }}|{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}|{% endfor %}")


def test_a_template_that_takes_tools_gets_them_natively(tokenizer):
    import copy

    from pdserve.server.prompts import chat_prompt_ids
    from pdserve.server.protocol import ChatCompletionRequest

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NATIVE_TEMPLATE
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ], "tools": [{"type": "function", "function": {"name": "get_time"}}]})
    text = tok.decode(chat_prompt_ids(tok, req.messages, False, tools=req.tool_dicts()))
    assert text == ('TOOL get_time|user: Time?|assistant: CALL get_time {"zone": "UTC"}|'
                    'tool: noon|')  # arguments as an object, no instruction of ours
