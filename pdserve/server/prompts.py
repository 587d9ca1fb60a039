"""Turning a request's prompt into token ids, and refusing prompts the model cannot take."""

from __future__ import annotations

from pdserve.media.image_inputs import PreparedImage
from pdserve.server.errors import bad_request
from pdserve.server.protocol import IMAGE_PLACEHOLDER, ChatMessage
from pdserve.server.tool_parsers import ParserName
from pdserve.server.tool_prompt import conversation, template_takes_tools


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Text is tokenized with the tokenizer's own special tokens; ids pass through."""
    if isinstance(prompt, str):
        if prompt == "":
            raise bad_request("prompt must not be empty", "prompt")
        return encode_text(tokenizer, prompt, add_special_tokens=True)
    return list(prompt)


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError as exc:
        raise bad_request(f"text is not valid Unicode: {exc}") from exc


def encode_text(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text` (refused with a 400 if it is not valid Unicode)."""
    _check_unicode(text)
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def chat_prompt_ids(
    tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
    continue_final_message: bool = False, add_special_tokens: bool = False,
    tools: list[dict] | None = None, parser: ParserName = "hermes",
    images: list[PreparedImage] | None = None,
) -> list[int]:
    """Render the chat template to text, then tokenize it (the template holds the specials).
    `continue_final_message`: the last message stays open, for the model to go on with it.
    `tools` go to a template that takes them, else into a system instruction (tool_prompt).
    `images`, one per image part in order: each placeholder becomes the image's tokens."""
    native = template_takes_tools(tokenizer.chat_template)
    turns = conversation(messages, tools, parser, native)
    for turn in turns:
        _check_unicode(turn["content"])
    if images is not None and template_takes_parts(tokenizer.chat_template):
        turns = [{**turn, "content": content_parts(turn["content"])} for turn in turns]
    try:
        text = tokenizer.apply_chat_template(
            turns, add_generation_prompt=add_generation_prompt, tokenize=False,
            continue_final_message=continue_final_message,
            tools=tools if native and tools else None,
        )
    except Exception as exc:  # a template may reject e.g. a conversation ending badly
        raise bad_request(f"messages could not be rendered by the chat template: {exc}",
                          "messages") from exc
    if images is None:
        return encode_text(tokenizer, text, add_special_tokens=add_special_tokens)
    return _expand_images(tokenizer, text, images, add_special_tokens)


def template_takes_parts(chat_template: str | dict | None) -> bool:
    """A vision model's template that renders content parts (SmolVLM's writes '<image>' for
    {"type": "image"}) rather than a string."""
    return "'image'" in str(chat_template or "") or '"image"' in str(chat_template or "")


def content_parts(text: str) -> list[dict]:
    """A turn's text as content parts, each image placeholder an image part (a placeholder
    the client typed becomes one too, and is refused by the count in _expand_images)."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts or [{"type": "text", "text": ""}]  # templates read content[0]


def _expand_images(tokenizer, text: str, images: list[PreparedImage],
                   add_special_tokens: bool) -> list[int]:
    """Each image placeholder of the rendered text replaced by the image's token text (as
    the model's processor does), then tokenized. Placeholders typed by the client, or image
    tokens in its text, would shift every image: refused."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) != len(images) + 1:
        raise bad_request(f"the messages' text must not contain {IMAGE_PLACEHOLDER!r}: it "
                          "stands for an image part", "messages")
    expanded = pieces[0] + "".join(img.prompt_text + piece
                                   for img, piece in zip(images, pieces[1:]))
    ids = encode_text(tokenizer, expanded, add_special_tokens=add_special_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if ids.count(image_token_id) != sum(img.input.num_tokens for img in images):
        raise bad_request("the messages' text must not contain the model's image tokens",
                          "messages")
    return ids


def resolve_max_tokens(
    prompt_ids: list[int], max_tokens: int | None, default: int | None,
    vocab_size: int, max_model_len: int,
) -> int:
    """Check the prompt against the vocabulary and context; return the generation budget.

    `default` None means "up to the end of the context" (chat); a number is the legacy
    completions default of OpenAI (16).
    """
    if not prompt_ids:
        raise bad_request("prompt must not be empty", "prompt")
    check_token_ids(prompt_ids, vocab_size, "prompt")
    room = max_model_len - len(prompt_ids)
    if room <= 0:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {len(prompt_ids)} tokens.", "prompt",
        )
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}, which is "
            f"{len(prompt_ids) + max_tokens} in total.", "max_tokens",
        )
    return max_tokens


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (size {vocab_size})", param)


def check_fits_cache(num_tokens: int, capacity_tokens: int) -> None:
    """A request larger than the whole KV cache could never be scheduled: refuse it now."""
    if capacity_tokens and num_tokens > capacity_tokens:
        raise bad_request(
            f"the request needs {num_tokens} tokens of KV cache but this instance holds "
            f"{capacity_tokens}; shorten the prompt or max_tokens", "max_tokens",
        )
