"""The router's own load accounting: what each request charges the instances it uses, and
the rough prompt length where the prompt is not tokenized."""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager

from pdserve.router.registry import Instance

CHARS_PER_TOKEN = 4  # the router does not tokenize: a rough count is enough to balance load
IMAGE_TOKENS_ESTIMATE = 17 * 64  # SmolVLM-256M: 4 x 4 tiles and the global image, 64 tokens each


def least_loaded(candidates: Iterable[Instance], exclude: Container[str] = frozenset()
                 ) -> Instance | None:
    """The candidate with the fewest outstanding tokens (ties: fewest requests, then URL)."""
    pool = [i for i in candidates if i.url not in exclude]
    if not pool:
        return None
    return min(pool, key=lambda i: (i.outstanding_tokens, i.in_flight, i.url))


class Charge:
    """`tokens` counted against an instance while a request to it is in flight, and
    `prefill` (uncached prompt tokens) until its first token is back. A `handoff` is D's
    part of a disaggregated request: the time to its first token is the hop."""

    def __init__(self, inst: Instance, tokens: int, prefill: int = 0,
                 handoff: bool = False) -> None:
        self.inst, self.tokens, self.prefill, self.released = inst, tokens, prefill, False
        self.handoff = handoff
        self.alone = inst.queued_prefill_tokens == 0  # its prefill time measures the rate
        self.started = time.monotonic()
        inst.outstanding_tokens += tokens
        inst.queued_prefill_tokens += prefill
        inst.in_flight += 1

    def first_token(self) -> None:
        """The prefill is done: its tokens leave the queue, and time it if it ran alone (or
        time D's hop)."""
        if self.handoff:
            self.handoff = False
            self.inst.observe_hop(time.monotonic() - self.started)
        if self.prefill:
            self.inst.queued_prefill_tokens -= self.prefill
            if self.alone:
                self.inst.observe_prefill(self.prefill, time.monotonic() - self.started)
            self.prefill = 0

    def release(self) -> None:
        """Idempotent: a stream's end and its error path may both call it."""
        if not self.released:
            self.released = True
            self.inst.queued_prefill_tokens -= self.prefill
            self.prefill = 0
            self.inst.outstanding_tokens -= self.tokens
            self.inst.in_flight -= 1


@contextmanager
def charged(inst: Instance, tokens: int, prefill: int = 0) -> Iterator[Charge]:
    """Charge the instance for the duration of the block."""
    charge = Charge(inst, tokens, prefill)
    try:
        yield charge
    finally:
        charge.release()


def estimate_prompt_tokens(body: dict) -> int:
    """Prompt tokens, roughly, from the prompt text or the chat messages."""
    if "messages" in body:
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        chars = sum(_content_chars(m.get("content")) + 8 for m in messages)
        images = sum(_num_images(m.get("content")) for m in messages)
        return chars // CHARS_PER_TOKEN + 1 + images * IMAGE_TOKENS_ESTIMATE
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    chars = len(prompt) if isinstance(prompt, str) else len(str(prompt))
    return chars // CHARS_PER_TOKEN + 1


def _content_chars(content: object) -> int:
    """A message's text length; image parts count apart (their URLs are not text)."""
    if isinstance(content, list):
        return sum(len(str(p.get("text") or "")) for p in content if isinstance(p, dict))
    return len(str(content or ""))


def _num_images(content: object) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")


def max_tokens_field(body: dict, chat: bool) -> object:
    """The body's max_tokens as the instances read it: in chat, max_completion_tokens wins;
    completions ignore it. Unchecked (None, 0, "9", ...): the instance refuses what is bad."""
    if chat and body.get("max_completion_tokens") is not None:
        return body["max_completion_tokens"]
    return body.get("max_tokens")


def requested_max_tokens(body: dict, chat: bool, default: int = 256) -> int:
    """Tokens the request may generate, for load accounting (`default` if unset or bad)."""
    value = max_tokens_field(body, chat)
    return value if type(value) is int and value > 0 else default
