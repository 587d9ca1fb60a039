"""Tool calling through the real `openai` client: "required" and a named function always give
a parseable call (the grammar enforces it), streamed calls accumulate to the same result,
and conversations with past calls and tool results render."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from server_helpers import assert_openai_error

from pdserve.server.prompts import chat_prompt_ids
from pdserve.server.protocol import ChatCompletionRequest

WEATHER = {"type": "object",
           "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                      "description": "The current weather in a city."}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME,
                                      "description": "The current time in a time zone."}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PROMPTS = ["What is the weather in Paris?", "What time is it in Tokyo?",
           "Should I take an umbrella in London today?"]
MAX_TOKENS = 40  # one call under these schemas is well under this


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _ask(oai, model_name, prompt, **fields):
    fields.setdefault("max_tokens", MAX_TOKENS)
    return oai.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": prompt}], tools=TOOLS,
        **fields)


def _check_calls(message) -> list[tuple[str, dict]]:
    """Each call names a tool, has an id, and its arguments validate against its schema."""
    assert message.tool_calls
    out = []
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_always_gives_a_valid_call(oai, model_name, temperature):
    for prompt in PROMPTS:
        choice = _ask(oai, model_name, prompt, tool_choice="required",
                      temperature=temperature, seed=3).choices[0]
        # parallel calls may go on until max_tokens: the calls complete by then are given
        assert choice.finish_reason in ("tool_calls", "length")
        _check_calls(choice.message)


def test_required_without_parallel_calls_gives_one_call(oai, model_name):
    for prompt in PROMPTS:
        choice = _ask(oai, model_name, prompt, tool_choice="required",
                      parallel_tool_calls=False, temperature=1.0, seed=5).choices[0]
        assert len(_check_calls(choice.message)) == 1


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_choice_calls_that_function(oai, model_name, name):
    choice = _ask(oai, model_name, PROMPTS[0], temperature=0.0,
                  tool_choice={"type": "function", "function": {"name": name}}).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [n for n, _ in _check_calls(choice.message)] == [name]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_time"}}])
def test_streamed_calls_accumulate_to_the_non_streamed_ones(oai, model_name, tool_choice):
    whole = _ask(oai, model_name, PROMPTS[1], tool_choice=tool_choice, temperature=0.0)
    state = ChatCompletionStreamState()
    for chunk in _ask(oai, model_name, PROMPTS[1], tool_choice=tool_choice, temperature=0.0,
                      stream=True):
        state.handle_chunk(chunk)
    streamed = state.get_final_completion().choices[0]
    want = whole.choices[0]
    assert streamed.finish_reason == want.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in want.message.tool_calls]


def test_none_ignores_the_tools(oai, model_name):
    choice = _ask(oai, model_name, PROMPTS[0], tool_choice="none", temperature=0.0,
                  max_tokens=8).choices[0]
    assert not choice.message.tool_calls and choice.message.content
    assert choice.finish_reason in ("length", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_gives_content_or_valid_calls(oai, model_name, stream):
    kw = dict(tool_choice="auto", temperature=0.0)
    if not stream:
        choice = _ask(oai, model_name, PROMPTS[0], **kw).choices[0]
    else:
        state = ChatCompletionStreamState()
        for chunk in _ask(oai, model_name, PROMPTS[0], stream=True, **kw):
            state.handle_chunk(chunk)
        choice = state.current_completion_snapshot.choices[0]  # final, even if "length"
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_a_conversation_with_calls_and_results_is_answered(oai, model_name):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]
    resp = oai.chat.completions.create(model=model_name, messages=messages, tools=TOOLS,
                                       max_tokens=8, temperature=0.0)
    assert resp.choices[0].message.content or resp.choices[0].message.tool_calls


def test_past_calls_and_tool_results_are_in_the_prompt(tokenizer):
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ], "tools": TOOLS})
    text = tokenizer.decode(chat_prompt_ids(tokenizer, req.messages, True,
                                            tools=req.tool_dicts()))
    assert '"name": "get_weather"' in text and "<tool_call>" in text  # the call, as hermes
    assert "21 degrees" in text and "<tools>" in text  # the result and the tool instruction
    assert "The current weather in a city." in text


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS * 2}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "bogus"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     None),
    ({"tools": TOOLS, "n": 2}, "n"),  # calls are parsed out of one reply
])
def test_bad_tools_are_a_400(client, fields, param):
    resp = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields})
    assert_openai_error(resp, 400, param)


FORCED_CALL = ('root ::= "Let me check. <tool_call>\\n{\\"name\\": \\"get_weather\\", '
               '\\"arguments\\": {\\"city\\": \\"" ("Paris" | "London") '
               '"\\", \\"unit\\": \\"celsius\\"}}\\n</tool_call>"')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_a_hermes_call_out_of_the_text(oai, model_name, stream):
    """SmolLM2-135M does not call tools by itself: a grammar makes it write a call in
    Hermes format after some text, which auto must split into content and the call."""
    kw = dict(tool_choice="auto", temperature=1.0, max_tokens=80,
              extra_body={"guided_grammar": FORCED_CALL})
    if not stream:
        choice = _ask(oai, model_name, PROMPTS[0], **kw).choices[0]
    else:
        state = ChatCompletionStreamState()
        for chunk in _ask(oai, model_name, PROMPTS[0], stream=True, **kw):
            state.handle_chunk(chunk)
        choice = state.current_completion_snapshot.choices[0]  # final, even if "length"
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.strip() == "Let me check."
    [(name, args)] = _check_calls(choice.message)
    assert name == "get_weather" and args["unit"] == "celsius"
