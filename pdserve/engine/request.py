"""One request's state inside the engine: its tokens, its blocks and where it is in its life."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.grammar import RequestGrammar
from pdserve.engine.handoff import KVHandoff
from pdserve.engine.sampling_params import SamplingParams
from pdserve.multimodal import ImageInput

if TYPE_CHECKING:
    from pdserve.engine.prompt_images import PromptImages


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # decode role: blocks allocated, pull pending
    RUNNING = "running"  # scheduled every step until it finishes
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self._value_ in _FINISHED_VALUES  # str hash is cached; an Enum's is not


_FINISHED_VALUES = frozenset({"stop", "length", "abort"})


@dataclass
class Request:
    """Tokens whose KV is in the cache are `num_computed_tokens`; the rest still need a forward."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 = not yet scheduled
    num_preemptions: int = 0
    num_pulled_tokens: int = 0  # D side: prompt tokens whose KV came from P (0: none, failed)
    prompt_digest: bytes | None = None  # seeded sampling's key of the prompt, made once
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    num_registered_blocks: int = 0  # leading blocks already published to the prefix cache
    # its P/D part, read by the engine's KV connector only: on P, hold the KV for D; on D,
    # where P holds the prompt's KV (cleared once the pull started: a retry prefills here)
    handoff: KVHandoff | None = None
    block_array: object | None = None  # numpy copy of block_ids for the input builder
    # async scheduling: tokens sampled on the device but not yet read back (0 or 1); the
    # scheduler counts them so the next step can feed them in before they are known
    num_pending_tokens: int = 0
    # a sibling choice of the same prompt: admitted only once this one's prompt is computed
    # and published, so that it hits the prefix cache instead of computing the prompt again
    prefill_leader: Request | None = None
    scheduled_time: float = 0.0  # monotonic, first time it was scheduled (0: not yet)
    first_token_time: float = 0.0  # monotonic, its first token sampled here (0: not yet)
    grammar: RequestGrammar | None = None  # structured output: its matcher, one token behind
    images: list[ImageInput] = field(default_factory=list)  # in prompt order (multimodal.py)
    prompt_images: PromptImages | None = None  # where `images` go: rows, block keys, cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None
