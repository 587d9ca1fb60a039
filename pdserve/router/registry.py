"""The router's registry of instances: role, health, heartbeat, and outstanding tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.router.policy import InstanceView

ROLES = ("colocated", "prefill", "decode")
ENCODER = "encoder"  # serves image embeddings to the others, never a request itself
REGISTRABLE = (*ROLES, ENCODER)
MIN_RATE_SAMPLE_TOKENS = 64
RATE_EWMA = 0.3  # weight of the newest prefill-rate sample


@dataclass
class Instance:
    """One engine instance the router may send requests to."""

    url: str
    roles: tuple[str, ...]  # usually one; a static URL given as --prefill and --decode: both
    static: bool = True  # from flags/config: kept when unhealthy; registered ones are dropped
    healthy: bool = False  # unknown until the first health check or successful request
    outstanding_tokens: int = 0  # the router's own count: prompt + max tokens in flight
    in_flight: int = 0
    queued_prefill_tokens: int = 0  # uncached prompt tokens sent, first token not yet back
    waiting: int = 0  # the engine's queue and KV usage, from its KV event stream's load lines
    running: int = 0
    kv_usage: float = 0.0
    prefill_rate: float | None = None  # prompt tokens/s, measured on prefills that ran alone
    hop_s: float | None = None  # D: seconds from opening a handed-off stream to its first token
    last_heartbeat: float = field(default_factory=time.monotonic)
    unhealthy_since: float | None = field(default_factory=time.monotonic)

    def mark(self, healthy: bool) -> None:
        if healthy:
            self.unhealthy_since = None
        elif self.healthy or self.unhealthy_since is None:
            self.unhealthy_since = time.monotonic()
        self.healthy = healthy

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill of `tokens` that took `seconds` with nothing queued before it."""
        if tokens < MIN_RATE_SAMPLE_TOKENS or seconds <= 0:
            return  # a short one measures the round trip, not the prefill
        rate = tokens / seconds
        old = self.prefill_rate
        self.prefill_rate = rate if old is None else old + RATE_EWMA * (rate - old)

    def observe_hop(self, seconds: float) -> None:
        """D took `seconds` from being handed a prefilled request to its first token."""
        if seconds > 0:
            old = self.hop_s
            self.hop_s = seconds if old is None else old + RATE_EWMA * (seconds - old)

    def view(self, cached_blocks: int = 0) -> InstanceView:
        """What a routing policy sees of it (`cached_blocks`: from the router's KV index)."""
        return InstanceView(self.url, self.roles, self.outstanding_tokens,
                            self.queued_prefill_tokens, self.in_flight, self.waiting,
                            self.running, self.kv_usage, self.prefill_rate, self.hop_s,
                            cached_blocks)

    @property
    def role(self) -> str:
        """Its roles as one label, e.g. "decode" or "prefill+decode"."""
        return "+".join(self.roles)

    def to_json(self) -> dict:
        return {"url": self.url, "role": self.role, "static": self.static,
                "healthy": self.healthy, "outstanding_tokens": self.outstanding_tokens,
                "in_flight": self.in_flight, "prefill_rate": self.prefill_rate,
                "hop_s": self.hop_s}


def normalize_url(url: str) -> str:
    """'host:port' or 'http://host:port/' → 'http://host:port'."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


class Registry:
    """All known instances by URL; registered ones expire when heartbeats or health lapse."""

    def __init__(self, heartbeat_ttl_s: float = 10.0) -> None:
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.instances: dict[str, Instance] = {}

    def add_static(self, url: str, role: str) -> Instance:
        """A configured instance; the same URL in a second role is one instance serving
        both (e.g. a vLLM instance with kv_role kv_both as prefill and decode)."""
        if role not in REGISTRABLE:
            raise ValueError(f"role must be one of {REGISTRABLE}, not {role!r}")
        url = normalize_url(url)
        inst = self.instances.get(url)
        if inst is None:
            inst = self.instances[url] = Instance(url, (role,), static=True)
        elif role not in inst.roles:
            inst.roles += (role,)
        return inst

    def register(self, url: str, role: str) -> Instance:
        """Join or heartbeat: a known URL keeps its load and health, and may change role."""
        if role not in REGISTRABLE:
            raise ValueError(f"role must be one of {REGISTRABLE}, not {role!r}")
        url = normalize_url(url)
        inst = self.instances.get(url)
        if inst is None:
            inst = self.instances[url] = Instance(url, (role,), static=False)
        inst.roles = (role,)
        inst.last_heartbeat = time.monotonic()
        return inst

    def deregister(self, url: str) -> bool:
        return self.instances.pop(normalize_url(url), None) is not None

    def expire(self) -> list[Instance]:
        """Drop registered instances whose heartbeat or health lapsed past the TTL."""
        now, ttl = time.monotonic(), self.heartbeat_ttl_s
        gone = [i for i in self.instances.values() if not i.static and (
            now - i.last_heartbeat > ttl
            or (i.unhealthy_since is not None and now - i.unhealthy_since > ttl))]
        for inst in gone:
            del self.instances[inst.url]
        return gone

    def healthy(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if role in i.roles and i.healthy]

    def all(self) -> list[Instance]:
        return list(self.instances.values())

    def engines(self) -> list[Instance]:
        """The instances that serve requests: every one but the encoders."""
        return [i for i in self.instances.values() if ENCODER not in i.roles]

    def can_serve(self) -> bool:
        """At least one instance can answer a whole request (any role but encoder serves
        plain ones)."""
        return any(i.healthy for i in self.engines())
