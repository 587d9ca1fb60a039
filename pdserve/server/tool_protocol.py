"""The chat request's tool-calling fields (OpenAI's shapes), bounded, and the grammar that
enforces `tool_choice: "required"` or a named function.

    tools                [{"type": "function", "function": {name, description, parameters}}]
    tool_choice          "none" | "auto" | "required" | {"type": "function", "function": {name}}
    parallel_tool_calls  true: "required" may call several functions at once

"required" constrains the output to a JSON array of calls `[{"name", "arguments"}]` (one
call at most without parallel_tool_calls); a named function to that function's arguments.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.engine.grammar import GrammarSpec
from pdserve.server.structured_protocol import MAX_GRAMMAR_CHARS, FieldError

MAX_TOOLS = 128
MAX_DESCRIPTION_CHARS = 4096
MAX_ARGUMENT_CHARS = 1024 * 1024  # a past call's arguments in the conversation
MAX_CALL_ID_CHARS = 256
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]  # OpenAI's rule
NO_PARAMETERS = {"type": "object", "properties": {}}

ToolMode = Literal["none", "auto", "required", "named"]


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: FunctionName
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments always follow it when the grammar applies

    def parameters_schema(self) -> dict:
        return self.parameters if self.parameters is not None else NO_PARAMETERS


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class FunctionRef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionRef


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: FunctionName
    arguments: str = Field(max_length=MAX_ARGUMENT_CHARS)  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(max_length=MAX_CALL_ID_CHARS)
    type: Literal["function"] = "function"
    function: CalledFunction

    def arguments_object(self) -> object:
        """The arguments as JSON for a chat template (which writes them out again)."""
        try:
            return json.loads(self.function.arguments)
        except json.JSONDecodeError:
            return self.function.arguments  # a template shows text as text


class ToolFields(BaseModel):
    """Mixed into the chat request."""

    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check_tools(self) -> None:
        """FieldError (a 400 naming the field) if tool_choice does not fit the tools."""
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools", "function names must be unique")
        if self.tool_choice not in (None, "none") and not names:
            raise FieldError("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in names:
            raise FieldError("tool_choice",
                             f"no tool is named {self.tool_choice.function.name!r}")

    def tool_mode(self) -> ToolMode:
        """What the tools are for: OpenAI's default is auto with tools, none without."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def named_function(self) -> str | None:
        return self.tool_choice.function.name if self.tool_mode() == "named" else None

    def tool_grammar(self) -> GrammarSpec | None:
        """The grammar that makes the output a call ("required", named); None otherwise."""
        mode = self.tool_mode()
        if mode == "named":
            name = self.named_function()
            fn = next(t.function for t in self.tools if t.function.name == name)
            schema = fn.parameters_schema()
        elif mode == "required":
            schema = calls_schema([t.function for t in self.tools], self.parallel_tool_calls)
        else:
            return None
        text = json.dumps(schema, separators=(",", ":"))
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the tools' schemas exceed {MAX_GRAMMAR_CHARS} characters")
        return GrammarSpec("json_schema", text)

    def tool_dicts(self) -> list[dict]:
        """The tools as a chat template (or the tool instruction) takes them."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


def calls_schema(functions: list[FunctionDef], parallel: bool) -> dict:
    """A JSON array of calls, each one of the functions with arguments that fit it."""
    call = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"enum": [f.name]}, "arguments": f.parameters_schema()},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for f in functions]}
    schema = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema
