"""The router's own tokenization of a prompt, exactly as the instances do it (the same
tokenizer, the same chat template, the same functions), so that the KV index can count the
prompt's cached blocks exactly. Runs in a worker thread: a long prompt takes milliseconds.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from pdserve.server.errors import APIError
from pdserve.server.prompts import chat_prompt_ids, completion_prompt_ids
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


class PromptTokenizer:
    """The model's tokenizer, loaded off the event loop when the router starts (`name`: the
    model path or preset the instances were given, or a tokenizer folder)."""

    def __init__(self, name: str | None = None, tokenizer: object = None) -> None:
        self.name = name
        self.tokenizer = tokenizer

    async def load(self) -> None:
        """Load it in a thread; a failure leaves text prompts untokenized (logged)."""
        if self.tokenizer is not None or self.name is None:
            return
        try:
            self.tokenizer = await asyncio.to_thread(_load, self.name)
        except Exception as exc:  # a bad path must not stop the router: it routes by load
            log.error("router: cannot load the tokenizer of %s (%s); prompts given as text "
                      "are routed without the prefix cache", self.name, exc)

    async def ids(self, chat: bool, body: dict) -> list[int] | None:
        """The prompt's token ids as an instance computes them; None where they cannot be
        known here (no tokenizer; a batch of prompts; a body the instance will refuse)."""
        prompt = None if chat else body.get("prompt")
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            return prompt
        if self.tokenizer is None:
            return None
        return await asyncio.to_thread(self.ids_now, chat, body)

    def ids_now(self, chat: bool, body: dict) -> list[int] | None:
        """`ids` in the calling thread."""
        try:
            if chat:
                req = ChatCompletionRequest.model_validate(body)
                if req.tool_mode() != "none":
                    return None  # the instance adds the tools in its parser's words
                if any(m.images() for m in req.messages):
                    return None  # image tokens depend on the decoded image: route by load
                return chat_prompt_ids(self.tokenizer, req.messages, req.add_generation_prompt)
            prompts = CompletionRequest.model_validate(body).prompts()
            if len(prompts) != 1:
                return None  # a batch: served whole, each prompt where it lands
            return completion_prompt_ids(self.tokenizer, prompts[0])
        except (APIError, ValidationError, ValueError, TypeError):
            return None  # the instance refuses it with the right 4xx; route it by load
        except Exception:  # whatever else a tokenizer raises: never fail routing over it
            log.exception("router: tokenizing a prompt failed; routed without the cache")
            return None


EMBEDDED = "embedded"  # the name of the embedded model's tokenizer (instances with no --model)


def _load(name: str):
    from pdserve.models.loader import load_tokenizer  # torch and transformers: only if used

    return load_tokenizer(None if name == EMBEDDED else name)
