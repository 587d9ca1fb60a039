"""Pydantic models of the OpenAI completion and chat requests, with their validation.

Types are strict (a string is not a number) and ranges are OpenAI's; anything this server
cannot honour (best_of other than n, suffix, echo with logprobs, ...) is refused with a
message rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.structured_protocol import StructuredOutputFields
from pdserve.server.tool_protocol import MAX_CALL_ID_CHARS, MAX_TOOLS, ToolCall, ToolFields

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
# Bounds on every size a client controls: each is far above real use and far below what
# would cost an instance seconds of CPU or gigabytes before the request is refused.
MAX_INT = 2**31 - 1  # counts and token ids
MAX_PROMPT_CHARS = 4 * 2**20  # a whole text prompt, or one message's text
MAX_PROMPT_TOKEN_IDS = 2**20
MAX_PROMPTS = 64  # a batch of prompts in /v1/completions
MAX_N = 16  # choices per prompt
MAX_CHOICES = 256  # prompts x n: engine requests one HTTP request may start
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024
MAX_STOP_CHARS = 1024  # one stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300
MAX_NAME_CHARS = 256  # model and user names
MAX_KV_PARAMS_KEYS = 64
# an image_url's URL: a ceiling only (--max-image-bytes bounds the image itself, with a 400
# naming the part); the HTTP body limit is the first bound
MAX_IMAGE_URL_CHARS = 2**28
IMAGE_PLACEHOLDER = "<image>"  # an image part in the text a chat template renders
MAX_ENCODER_HANDLES = 256  # a ceiling: their count must equal the request's images

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Prompts = Annotated[list[Text], Field(max_length=MAX_PROMPTS)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKEN_IDS)]
Parts = Annotated[list["ContentPart"], Field(max_length=MAX_CONTENT_PARTS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False



class Resume(BaseModel):
    """Internal, from the router only: continue a stream that another instance began. Its
    tokens follow the prompt as output already generated; the client has `text_chars`
    characters of their text, so the text sent from here continues after those."""

    model_config = ConfigDict(strict=True, extra="forbid")

    token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)
    text_chars: int = Field(ge=0, le=MAX_INT)


class _SamplingRequest(StructuredOutputFields):
    """Fields shared by /v1/completions and /v1/chat/completions (with those of structured
    output: server/structured_protocol.py)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Name | None = None
    max_tokens: Count | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[Name, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: Name | None = None
    # vLLM / pdserve extensions.
    top_k: int = Field(0, ge=-1, le=MAX_INT)  # 0 or -1 = disabled
    min_p: Probability = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=MAX_INT)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM)
    kv_transfer_params: dict | None = Field(None, max_length=MAX_KV_PARAMS_KEYS)
    # The router's P request: the max_tokens D will get, so that P refuses (with the
    # context-length 400) a request D would refuse, before the router starts streaming.
    decode_max_tokens: Count | None = None
    return_token_ids: bool = False  # each choice carries its tokens' ids (vLLM's field)
    resume: Resume | None = None  # internal: see Resume

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids as strings (OpenAI's shape), not words."""
        for key in bias or {}:
            if not key.isascii() or not key.isdigit() or int(key) > MAX_INT:
                raise ValueError(f"logit_bias keys must be token ids (digits); got {key!r}")
        return bias

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingRequest:
        if len(self.stop_strings()) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(s == "" for s in self.stop_strings()):
            raise ValueError("stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        if self.resume is not None and not self.stream:
            raise ValueError("resume needs stream true")
        if self.n > 1 and (self.resume is not None or self.kv_transfer_params):
            raise ValueError("n > 1 cannot be combined with kv_transfer_params or resume")
        return self

    def logit_bias_ids(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (range-checked against the vocabulary by
        the server, which knows it)."""
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def num_logprobs(self) -> int | None:
        """How many alternatives to return per sampled token; None = no logprobs."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's view of this request (stop strings stay with the server)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=self.num_logprobs(),
            logit_bias=self.logit_bias_ids() or None,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is text or token ids, or a batch of up to MAX_PROMPTS
    of either; each prompt gets `n` choices, indexed prompt-major."""

    prompt: Text | TokenIds | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] \
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None

    @model_validator(mode="after")
    def _check_completion_fields(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices (prompts x n) per request")
        if len(prompts) > 1 and (self.resume is not None or self.kv_transfer_params):
            raise ValueError("a batch of prompts cannot be combined with kv_transfer_params "
                             "or resume")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (prompt logprobs are not "
                             "computed); drop one of them")
        if self.echo and (self.resume is not None or self.kv_transfer_params):
            raise ValueError("echo cannot be combined with kv_transfer_params or resume")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is supported only equal to n (every choice returned)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry of a batch (a lone prompt is a batch of one)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]

    def num_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: Text


class ImageURL(BaseModel):
    """OpenAI's image_url object. `detail` "low" sends the model the global image alone
    (no tiles: fewer tokens); "auto" and "high" tile it as the model's processor does."""

    model_config = ConfigDict(strict=True, extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS)
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    """An image in a user message (media/ turns it into the model's pixels and tokens)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | Parts | None = None
    name: Name | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # assistant's
    tool_call_id: str | None = Field(None, max_length=MAX_CALL_ID_CHARS)  # a tool's answer

    @model_validator(mode="after")
    def _images_from_users(self) -> ChatMessage:
        if self.images() and self.role != "user":
            raise ValueError("image_url parts are allowed in user messages only")
        return self

    def text(self) -> str:
        """The content as text; each image stands as IMAGE_PLACEHOLDER where it was."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextPart) else IMAGE_PLACEHOLDER
                       for part in self.content)

    def images(self) -> list[tuple[int, ImageURL]]:
        """(index in content, image_url) of each image part, in order."""
        if not isinstance(self.content, list):
            return []
        return [(i, p.image_url) for i, p in enumerate(self.content) if isinstance(p, ImagePart)]


class ChatCompletionRequest(_SamplingRequest, ToolFields):
    """POST /v1/chat/completions. Messages (and tools) go through the model's chat template;
    tool fields: server/tool_protocol.py."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # internal (router -> P): an encoder's handle, or null, per image part in prompt order
    encoder_handles: list[dict | None] | None = Field(None, max_length=MAX_ENCODER_HANDLES)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens  # the newer name wins
        if self.tool_mode() in ("required", "named") and self._grammar_fields():
            raise ValueError("tool_choice required or a named function cannot be combined "
                             "with response_format or guided decoding")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """POST /tokenize, vLLM's shape: a `prompt` (text) or chat `messages`, not both."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Name | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.messages is not None and self.continue_final_message \
                and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both "
                             "be true")
        return self

    def with_special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.prompt is not None  # a chat template writes its own special tokens


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids back to text (each id is checked against the vocabulary)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Name | None = None
    tokens: TokenIds
