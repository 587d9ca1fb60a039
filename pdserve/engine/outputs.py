"""What the engine hands back: requests in, token deltas out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.histogram import (
    ITERATION_TOKEN_BUCKETS,
    KV_TRANSFER_BUCKETS,
    StepHistogram,
)
from pdserve.engine.sampling_params import SamplingParams
from pdserve.multimodal import ImageInput

if TYPE_CHECKING:
    from pdserve.engine.handoff import HeldPrefill, KVHandoff
    from pdserve.multimodal import ImageInput  # torch: not for the server's light imports


@dataclass
class EngineRequest:
    """A tokenized request as the engine receives it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # its part in P/D: hold the KV for D (on P), or pull P's (on D); see engine/handoff.py
    handoff: KVHandoff | None = None
    # a resumed request: tokens another instance generated for it (and the client has);
    # the engine recomputes their KV and continues after them, counting them as output
    output_token_ids: list[int] = field(default_factory=list)
    # one of n choices of one prompt: wait for this earlier sibling's prefill, then take
    # its prompt blocks from the prefix cache (the prompt is computed once, not n times)
    prefill_after: str | None = None
    # the prompt's images, in order (pdserve/multimodal.py); their pixels are in shared
    # memory, so crossing to the engine process sends a handle, not the bytes
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestTimes:
    """When a request reached each phase, in `time.monotonic()` seconds (system-wide on
    Linux, so the server process can compare them with its own); 0.0 = never reached.
    `scheduled` is the first time the scheduler gave it blocks (on D: its KV pull began);
    `first_token` the first token sampled here (on D: after P's, which came with the KV).
    Its counts (set as it finishes) say what its life cost: preemptions, KV pulled from P."""

    arrival: float
    scheduled: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    num_preemptions: int = 0
    num_pulled_tokens: int = 0  # D side: prompt tokens whose KV came from P (not computed)

    @property
    def queue_s(self) -> float:
        """Waiting to be scheduled (an aborted request that never was: until the abort)."""
        return max((self.scheduled or self.finished) - self.arrival, 0.0)

    @property
    def prefill_s(self) -> float:
        """Scheduled -> first token (on D: the KV pull, then the first decode step)."""
        if not self.scheduled:
            return 0.0
        return max((self.first_token or self.finished) - self.scheduled, 0.0)

    @property
    def decode_s(self) -> float:
        return max(self.finished - self.first_token, 0.0) if self.first_token else 0.0

    @property
    def inference_s(self) -> float:
        return max(self.finished - self.scheduled, 0.0) if self.scheduled else 0.0


@dataclass
class RequestOutput:
    """New tokens of one request from one engine step (a delta, not the whole text)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    held: HeldPrefill | None = None  # P: the finished prefill's KV, held for D
    error: str | None = None  # set when the engine refused or failed the request
    times: RequestTimes | None = None  # set on the finishing output


@dataclass
class EngineStats:
    """A snapshot for /metrics and the router's load signal."""

    num_running: int = 0
    num_waiting: int = 0
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    num_preemptions: int = 0
    num_pulling: int = 0  # D side: requests waiting for their KV
    num_waiting_to_pull: int = 0  # D side: waiting requests whose pull has not started
    num_pulled_tokens: int = 0  # D side: prompt tokens whose KV came from P
    num_leases: int = 0  # P side: prefills holding KV for a decode instance
    kv_pulls_ok: int = 0
    kv_pulls_failed: int = 0  # each fell back to a local prefill
    kv_bytes_pulled: int = 0
    request_failures: int = 0  # requests failed by an unexpected error (the engine lived on)
    # tokens computed per step, and D's KV pull durations: cumulative bucket counts
    iteration_tokens: StepHistogram = field(
        default_factory=lambda: StepHistogram(ITERATION_TOKEN_BUCKETS))
    kv_transfer_seconds: StepHistogram = field(
        default_factory=lambda: StepHistogram(KV_TRANSFER_BUCKETS))
    # Triton compiles, CUDA-graph captures, torch.compile graphs since the engine said ready,
    # by kind (engine/compilations.py): each stalled a step, so this should stay 0
    compilations_after_ready: dict[str, int] = field(default_factory=dict)

    @property
    def kv_usage(self) -> float:
        used = self.num_total_blocks - self.num_free_blocks
        return used / self.num_total_blocks if self.num_total_blocks else 0.0
