"""Structured output through the real `openai` client: what comes back matches the schema,
regex or choice asked for, greedy or sampled; a grammar that does not parse is a 400."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from server_helpers import assert_openai_error

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PET = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]},
        "owner": {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 10},
                                 "adult": {"type": "boolean"}},
                  "required": ["name", "adult"], "additionalProperties": False},
    },
    "required": ["kind", "owner"],
    "additionalProperties": False,
}
SHOPPING = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "maxItems": 3,
                  "items": {"type": "string", "enum": ["milk", "eggs", "bread", "tea"]}},
        "urgent": {"type": "boolean"},
    },
    "required": ["items", "urgent"],
    "additionalProperties": False,
}
CASES = [
    ("Describe a person as JSON.", PERSON),
    ("Describe a pet and its owner as JSON.", PET),
    ("Write a shopping list as JSON.", SHOPPING),
]
MAX_TOKENS = 60  # each schema's longest output is well under this


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema,
                                                   "strict": True}}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(("prompt", "schema"), CASES)
def test_json_schema_output_validates(oai, model_name, prompt, schema, temperature):
    resp = oai.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": prompt}],
        response_format=_schema_format(schema), max_tokens=MAX_TOKENS,
        temperature=temperature, seed=7)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streams_the_same_text(oai, model_name):
    body = dict(model=model_name, messages=[{"role": "user", "content": CASES[1][0]}],
                response_format=_schema_format(PET), max_tokens=MAX_TOKENS, temperature=0.0)
    whole = oai.chat.completions.create(**body).choices[0].message.content
    chunks = oai.chat.completions.create(**body, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PET)


def test_json_object_gives_a_json_object(oai, model_name):
    resp = oai.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Give a person as JSON."}],
        response_format={"type": "json_object"}, max_tokens=80, temperature=0.0)
    choice = resp.choices[0]
    if choice.finish_reason == "length":  # an open-ended object may run past max_tokens
        assert choice.message.content.startswith("{")
    else:
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guided_choice_is_one_of_the_choices(oai, model_name, temperature):
    choices = ["positive", "negative", "neutral"]
    resp = oai.chat.completions.create(
        model=model_name, temperature=temperature, max_tokens=10,
        messages=[{"role": "user", "content": "Sentiment of: I love this!"}],
        extra_body={"guided_choice": choices})
    assert resp.choices[0].message.content in choices
    assert resp.choices[0].finish_reason == "stop"


def test_guided_regex_matches(oai, model_name):
    pattern = r"\d{3}-\d{4}"
    resp = oai.completions.create(model=model_name, prompt="A phone number:", max_tokens=12,
                                  temperature=1.0, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, resp.choices[0].text)


def test_completions_take_response_format(oai, model_name):
    resp = oai.completions.create(model=model_name, prompt="A person as JSON:", max_tokens=40,
                                  temperature=0.0,
                                  extra_body={"response_format": _schema_format(PERSON)})
    jsonschema.validate(json.loads(resp.choices[0].text), PERSON)


def test_structured_outputs_choice(oai, model_name):
    resp = oai.chat.completions.create(
        model=model_name, max_tokens=5, temperature=1.0,
        messages=[{"role": "user", "content": "Yes or no?"}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert resp.choices[0].message.content in ("yes", "no")


def test_guided_grammar(oai, model_name):
    grammar = 'root ::= "The answer is " [0-9] [0-9]? "."'
    resp = oai.completions.create(model=model_name, prompt="Q: 2+2?\nA:", max_tokens=10,
                                  temperature=0.0, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"The answer is \d\d?\.", resp.choices[0].text)


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_json": "{not json"}, None),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, None),
    ({"guided_regex": "a" * 70000}, "guided_regex"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
])
def test_bad_grammar_is_a_400_naming_the_field(client, fields, param):
    resp = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields})
    assert_openai_error(resp, 400, param)


def test_bad_schema_raises_in_the_openai_client(oai, model_name):
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        oai.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            response_format=_schema_format({"type": "object", "properties": {"a": 3}}))
