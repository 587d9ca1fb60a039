"""The request fields that ask for structured output, as OpenAI and vLLM name them, and
the one grammar they come down to.

    response_format {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}
    guided_json | guided_regex | guided_choice | guided_grammar      (vLLM's extra_body)
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": true}
                                                                     (vLLM's newer name)

At most one may be given. Sizes are bounded so that parsing and compiling stay cheap; the
server parses the grammar (a 400 naming the field if it is invalid), the engine compiles it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdserve.engine.grammar import GrammarSpec, check_grammar

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema (as JSON), regex or EBNF grammar
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
MAX_SCHEMA_NAME_CHARS = 64  # OpenAI's limit on json_schema.name

GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choice = Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]
Choices = Annotated[list[Choice], Field(min_length=1, max_length=MAX_CHOICES)]
Schema = dict | GrammarText  # vLLM's guided_json takes an object or its JSON text


class FieldError(ValueError):
    """A value that pydantic alone cannot judge (a grammar that does not parse, a tool
    choice that names no tool), with the request field that gave it: a 400 naming it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=MAX_SCHEMA_NAME_CHARS)
    description: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly (strict or not)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    json_: Schema | None = Field(None, alias="json")
    regex: GrammarText | None = None
    choice: Choices | None = None
    grammar: GrammarText | None = None
    json_object: Literal[True] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [v for v in (self.json_, self.regex, self.choice, self.grammar,
                             self.json_object) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar and "
                             "json_object")
        return self


class StructuredOutputFields(BaseModel):
    """Mixed into the completion and chat requests."""

    response_format: ResponseFormat | None = None
    guided_json: Schema | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Choices | None = None
    guided_grammar: GrammarText | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_grammar(self) -> StructuredOutputFields:
        asked = [name for name, _ in self._grammar_fields()]
        if len(asked) > 1:
            raise ValueError(f"give at most one of {', '.join(asked)}")
        return self

    def _grammar_fields(self) -> list[tuple[str, GrammarSpec]]:
        """(the field's name, its grammar) for each field given that asks for one."""
        rf, so = self.response_format, self.structured_outputs
        asked = [("guided_json", "json_schema", self.guided_json),
                 ("guided_regex", "regex", self.guided_regex),
                 ("guided_choice", "choice", self.guided_choice),
                 ("guided_grammar", "ebnf", self.guided_grammar)]
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", "json_object", ""))
        elif rf is not None and rf.type == "json_schema":
            asked.append(("response_format.json_schema.schema", "json_schema",
                          rf.json_schema.schema_))
        if so is not None:
            asked += [("structured_outputs.json", "json_schema", so.json_),
                      ("structured_outputs.regex", "regex", so.regex),
                      ("structured_outputs.choice", "choice", so.choice),
                      ("structured_outputs.grammar", "ebnf", so.grammar),
                      ("structured_outputs.json_object", "json_object",
                       "" if so.json_object else None)]
        return [(name, _spec(name, kind, value)) for name, kind, value in asked
                if value is not None]

    def grammar_spec(self) -> GrammarSpec | None:
        """The grammar the output must match, checked: FieldError (for a 400 naming
        the field) if it does not parse."""
        fields = self._grammar_fields()
        if not fields:
            return None
        name, spec = fields[0]
        if len(spec.text) > MAX_GRAMMAR_CHARS:
            raise FieldError(name, f"at most {MAX_GRAMMAR_CHARS} characters are allowed")
        try:
            check_grammar(spec)
        except ValueError as exc:
            raise FieldError(name, str(exc)) from exc
        return spec


def _spec(name: str, kind: str, value: object) -> GrammarSpec:
    try:
        if kind == "json_schema":
            value = _schema_text(value)
        elif kind == "choice":
            value = json.dumps(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    return GrammarSpec(kind, value)


def _schema_text(schema: dict | str) -> str:
    """A schema as compact JSON text (a text schema must itself be a JSON object)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    return json.dumps(schema, separators=(",", ":"))
