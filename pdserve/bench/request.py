"""The two records a benchmark passes around: what to send, and what happened."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestSpec:
    """One request a workload wants sent."""

    prompt: str
    prompt_len: int  # the client's own token count of `prompt`
    output_len: int  # max_tokens asked for
    arrival_s: float | None = None  # trace replay: offset from the start, else None
    category: str = ""  # workload sub-kind (e.g. "inline-completion")
    slo_ms: dict[str, float] = field(default_factory=dict)  # per-request SLO overrides
    group: int = -1  # shared-prefix group, -1 when none
    images: list[str] = field(default_factory=list)  # image URLs sent before the text (chat)
    vision_len: int = 0  # of prompt_len: the images' tokens, as the model's processor counts


@dataclass
class RequestRecord:
    """Everything measured about one request; times are seconds from the run's start."""

    index: int
    prompt_len: int
    requested_output_len: int
    category: str
    scheduled_s: float  # when the schedule said to send it
    ready_s: float  # max(scheduled, when a concurrency slot freed): the intended send time
    send_s: float = 0.0  # when the client actually sent it
    chunk_s: list[float] = field(default_factory=list)  # arrival of each content chunk
    end_s: float = 0.0  # when the response finished (or failed)
    streamed: bool = True
    output_text: str = ""
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    usage_cached_tokens: int | None = None  # prompt tokens the server found in its cache
    error: str | None = None
    cancelled: bool = False  # stopped by the runner (early stop), neither success nor failure
    slo_ms: dict[str, float] = field(default_factory=dict)
    vision_len: int = 0  # of prompt_len: image tokens (the spec's)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled

    @property
    def schedule_delay_s(self) -> float:
        """The client's own lag: how late it sent compared with when it meant to."""
        return self.send_s - self.ready_s
