"""The choices of one answer: n per prompt, each one engine request, run side by side.

Choice i of a prompt is engine request `<id>-<i>` (a lone choice keeps `<id>`); siblings
name the prompt's first choice in `prefill_after`, so the engine computes the shared prompt
once. Choices are started in order (the first reaches the engine first), collected
concurrently, and streamed interleaved as their tokens come, each chunk naming its index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pdserve.server.generation import Delta, Generation


@dataclass
class Choice:
    """One choice of the answer: where it goes, its generation, and its echoed prompt."""

    index: int
    gen: Generation
    echo: str = ""  # /v1/completions echo: the prompt's text, sent before the completion
    first_of_prompt: bool = True  # counts its prompt in `usage` (its siblings share it)


@dataclass
class Collected:
    """A choice's whole output, for the non-streaming body."""

    text: str
    logprobs: list
    finish: str | None
    stop_reason: str | int | None
    token_ids: list[int]


def cancel_all(choices: list[Choice]) -> Callable[[], None]:
    """A callback that aborts every choice's engine request (idempotent)."""
    return lambda: [c.gen.cancel() for c in choices]


async def start_all(choices: list[Choice]) -> None:
    """Submit the choices in order; if one is refused, the started ones are aborted."""
    for i, c in enumerate(choices):
        try:
            await c.gen.start()
        except BaseException:
            for started in choices[:i]:
                started.gen.cancel()
            raise


def usage(choices: list[Choice]) -> dict:
    """OpenAI's usage: each prompt counted once, every choice's completion tokens."""
    prompt = sum(c.gen.prompt_tokens for c in choices if c.first_of_prompt)
    completion = sum(c.gen.completion_tokens for c in choices)
    cached = sum(c.gen.cached_tokens for c in choices if c.first_of_prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _collect(c: Choice) -> Collected:
    out = Collected(c.echo, [], None, None, [])
    async for delta in c.gen.deltas():
        out.text += delta.text
        out.token_ids += delta.token_ids
        out.logprobs.extend(delta.logprobs)
        out.finish, out.stop_reason = delta.finish_reason, delta.stop_reason
    return out


async def collect_all(choices: list[Choice]) -> list[Collected]:
    """Run every choice to its end; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_collect(c)) for c in choices]
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


async def interleaved(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Every choice's deltas as they come (an echo first); raises the first failure."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            if c.echo:
                await queue.put((c, Delta(text=c.echo, token_ids=[])))
            async for delta in c.gen.deltas():
                await queue.put((c, delta))
            await queue.put((c, None))
        except Exception as exc:  # the consumer raises it: a dead pump must not hang it
            await queue.put((c, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            c, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield c, item
    finally:
        for t in tasks:
            t.cancel()  # a pump still running aborts its engine request as it unwinds
