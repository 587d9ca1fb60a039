"""Structured output through the router of a 1P1D pair: P samples the first token under the
grammar, D continues the grammar from it, and the whole answer validates."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.router.cluster import metric, start_router

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "size": {"enum": ["small", "medium", "large"]},
        "sights": {"type": "array", "maxItems": 2,
                   "items": {"type": "string", "maxLength": 10}},
    },
    "required": ["city", "size", "sights"],
    "additionalProperties": False,
}
# The schema bounds the answer: 12 + 2 x 10 characters, each at most 4 byte-tokens, plus ~30
# tokens of keys and punctuation. Sampled at temperature 1 the strings can be katakana spelled
# byte by byte, so the budget must cover that bound for the grammar (not max_tokens) to end it.
MAX_TOKENS = 4 * (12 + 2 * 10) + 40
PROMPTS = ["Describe Paris as JSON.", "Describe a small town as JSON.", "Tokyo, as JSON:"]


@pytest.fixture(scope="module")
def router(fleet, routers_tmp):
    r = start_router(routers_tmp, prefill=[fleet.p0], decode=[fleet.d0])
    yield r
    r.stop()


@pytest.fixture(scope="module")
def oai(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


def _ask(oai: openai.OpenAI, prompt: str, **fields):
    return oai.chat.completions.create(
        model=oai.models.list().data[0].id, messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
            "name": "city", "schema": SCHEMA, "strict": True}}, **fields)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_1p1d_json_schema_output_validates(oai, router, temperature):
    before = metric(router.url, "pdserve_router:requests_total", kind="disagg")
    for prompt in PROMPTS:
        choice = _ask(oai, prompt, temperature=temperature).choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert metric(router.url, "pdserve_router:requests_total", kind="disagg") \
        == before + len(PROMPTS)


def test_1p1d_streamed_json_matches_the_whole_answer(oai):
    whole = _ask(oai, PROMPTS[0], temperature=0.0).choices[0].message.content
    chunks = _ask(oai, PROMPTS[0], temperature=0.0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), SCHEMA)


def test_1p1d_guided_choice(oai):
    resp = oai.chat.completions.create(
        model=oai.models.list().data[0].id, max_tokens=8, temperature=1.0,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        extra_body={"guided_choice": ["yes, it is", "no, it is not"]})
    assert resp.choices[0].message.content in ("yes, it is", "no, it is not")


WEATHER = {"type": "object",
           "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_weather"}}])
def test_1p1d_tool_call_streams_like_the_whole_answer(oai, tool_choice):
    from openai.lib.streaming.chat import ChatCompletionStreamState

    body = dict(model=oai.models.list().data[0].id, tools=TOOLS, tool_choice=tool_choice,
                parallel_tool_calls=False, max_tokens=40, temperature=0.0,
                messages=[{"role": "user", "content": "Weather in Tokyo?"}])
    whole = oai.chat.completions.create(**body).choices[0]
    state = ChatCompletionStreamState()
    for chunk in oai.chat.completions.create(**body, stream=True):
        state.handle_chunk(chunk)
    streamed = state.get_final_completion().choices[0]
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert streamed.message.tool_calls[0].function.arguments == \
        whole.message.tool_calls[0].function.arguments
