"""--chat-template: a Jinja chat template given as a file or inline, checked before use."""

from __future__ import annotations

from pathlib import Path

SAMPLE = [{"role": "system", "content": "You are helpful."},
          {"role": "user", "content": "Hello"},
          {"role": "assistant", "content": "Hi!"},
          {"role": "user", "content": "How are you?"}]


def read_chat_template(value: str) -> str:
    """The template: the file's text if `value` names a file, else `value` itself (inline
    Jinja). Raises ValueError if it is neither a file nor Jinja, or does not parse."""
    path = Path(value)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{" in value:
        text = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # a syntax error stops the server before minutes of model loading
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template does not parse: {exc} (line {exc.lineno})") from exc
    return text


def install_chat_template(tokenizer, template: str) -> None:
    """Make `template` the tokenizer's chat template, once it renders a sample conversation
    to text (as transformers renders it for every request); ValueError otherwise."""
    tokenizer.chat_template = template
    try:
        text = tokenizer.apply_chat_template(SAMPLE, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:
        raise ValueError(f"--chat-template does not render a conversation: {exc}") from exc
    if not isinstance(text, str) or "How are you?" not in text:
        raise ValueError("--chat-template renders a conversation without its messages")
