"""Where a request runs: one policy object turns a view of the request and of the instances
into a Decision, "whole on X" or "prefill on P, decode on D". The proxy only carries it out
(and retries, and streams). Pure: no I/O, no clock, so a planner can run it in a simulator.

A policy is a chooser (which instance of a set: round robin, least loaded, or cache-aware,
the lowest predicted time to first token) and a split rule (whether to disaggregate: by a
fixed prompt length, or conditionally, from the measured rates, the cache and P's queue).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Stage = Literal["whole", "prefill", "decode"]
ANY_ROLE = ("decode", "colocated", "prefill")  # whole on one instance: decode ones first
DEFAULT_PREFILL_RATE = 2000.0  # prompt tokens/s assumed until an instance has been measured
DEFAULT_HOP_S = 0.05  # what a P -> D hand-off costs beyond the prefill, until one D measured it


@dataclass(frozen=True)
class InstanceView:
    """What a policy knows of one healthy instance."""

    url: str
    roles: tuple[str, ...]
    outstanding_tokens: int = 0  # prompt + max tokens the router has in flight there
    queued_prefill_tokens: int = 0  # uncached prompt tokens sent there, not yet prefilled
    in_flight: int = 0
    waiting: int = 0  # the engine's own queue, from its load reports
    running: int = 0
    kv_usage: float = 0.0
    prefill_rate: float | None = None  # measured prompt tokens/s (None: not yet)
    hop_s: float | None = None  # measured: D's open of a handed-off stream to its first token
    cached_blocks: int = 0  # blocks its prefix cache holds, by the router's KV index

    def rate(self) -> float:
        return self.prefill_rate or DEFAULT_PREFILL_RATE

    def hop(self, default: float = DEFAULT_HOP_S) -> float:
        return default if self.hop_s is None else self.hop_s


@dataclass(frozen=True)
class RequestView:
    """What a policy knows of one request: its prompt's length, and how many of its leading
    tokens each instance holds in its prefix cache (absent: none, or unknown)."""

    prompt_tokens: int
    needs_decode: bool = True  # False: one token (or a bad max_tokens P refuses) -> P alone
    whole_only: bool = False  # several choices or echo: one instance serves it all
    cached: Mapping[str, int] = field(default_factory=dict)

    def uncached_on(self, url: str) -> int:
        return max(self.prompt_tokens - self.cached.get(url, 0), 0)


@dataclass(frozen=True)
class Decision:
    """Where the request goes, and why. `kind` is the route's label in /metrics: disagg,
    or a whole-request route (colocated, fallback, prefill_only, short_prompt,
    whole_on_decode, whole_only)."""

    kind: str
    reason: str
    whole: str | None = None  # the URL that serves it whole
    prefill: str | None = None
    decode: str | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class RoutingPolicy(Protocol):
    """The router's one seam for choosing instances."""

    name: str

    def decide(self, request: RequestView, instances: Sequence[InstanceView]
               ) -> Decision | None:
        """Where to run `request` among the healthy `instances` (None: none can)."""

    def pick(self, request: RequestView, candidates: Sequence[InstanceView], stage: Stage
             ) -> InstanceView | None:
        """The best of `candidates` for one stage (the proxy's retries use it too)."""


# ---- choosers: which instance of a set ----------------------------------------------------


class Chooser(Protocol):
    def pick(self, request: RequestView, candidates: Sequence[InstanceView], stage: Stage
             ) -> InstanceView | None: ...


class LeastLoaded:
    """The fewest outstanding tokens (ties: fewest requests, then URL)."""

    def pick(self, request: RequestView, candidates: Sequence[InstanceView], stage: Stage
             ) -> InstanceView | None:
        return min(candidates, key=lambda i: (i.outstanding_tokens, i.in_flight, i.url),
                   default=None)


class RoundRobin:
    """Each stage takes the candidates in turn, in URL order."""

    def __init__(self) -> None:
        self._turns = {stage: itertools.count() for stage in ("whole", "prefill", "decode")}

    def pick(self, request: RequestView, candidates: Sequence[InstanceView], stage: Stage
             ) -> InstanceView | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda i: i.url)
        return ordered[next(self._turns[stage]) % len(ordered)]


def predicted_ttft(request: RequestView, inst: InstanceView) -> float:
    """Seconds until `inst` could give the first token: its queued prefill work, then the
    part of this prompt it does not hold, at its measured rate."""
    return (inst.queued_prefill_tokens + request.uncached_on(inst.url)) / inst.rate()


class CacheAware:
    """Prefill (or whole): the lowest predicted TTFT, ties broken by decode load, then by the
    fewest cached blocks (a new prefix goes where it evicts least: an idle fleet's prefixes
    spread over every instance's cache instead of thrashing the first one's), then KV
    usage. Decode: the D that holds most of the prompt (it pulls only the rest), net of its
    decode load in tokens."""

    def pick(self, request: RequestView, candidates: Sequence[InstanceView], stage: Stage
             ) -> InstanceView | None:
        if stage == "decode":
            return min(candidates, key=lambda i: (
                i.outstanding_tokens - request.cached.get(i.url, 0), i.kv_usage, i.url),
                default=None)
        return min(candidates, key=lambda i: (
            predicted_ttft(request, i), i.outstanding_tokens, i.cached_blocks, i.kv_usage,
            i.url), default=None)


# ---- split rules: whether to disaggregate --------------------------------------------------


class SplitRule(Protocol):
    def split(self, request: RequestView, p: InstanceView, d: InstanceView
              ) -> tuple[bool, str]:
        """(disaggregate?, the reason) for the chosen P and D."""


@dataclass
class MinPromptSplit:
    """Disaggregate a prompt of at least `min_prompt_tokens` (0: always)."""

    min_prompt_tokens: int = 0

    def split(self, request: RequestView, p: InstanceView, d: InstanceView
              ) -> tuple[bool, str]:
        if request.prompt_tokens < self.min_prompt_tokens:
            return False, "short_prompt"
        return True, "long_prompt"


@dataclass
class ConditionalSplit:
    """Whole on D, or P then D, from what each costs (all in seconds, from measured rates):

    - the stall: D prefilling the part of the prompt it lacks, in one step, during which
      every decode on D waits: those running, hand-offs landing, later arrivals' hand-offs;
    - the hop: what handing a request from P to D costs it (D's measured time from the
      hand-off to its first token; `hop_s` until this D has been measured), which is also
      the inter-token gap that disaggregating puts into its own stream;
    - the two predicted times to first token: P's queue plus P's prefill, against D's.

    Whole on D when the stall is shorter than the hop (`small_uncached`: no decode waits
    longer than a hand-off would make it). Past that, only within `max_stall_s`, the gap a
    whole-on-D prefill may put into the decodes it meets, those already there and those
    that land during it: when nothing decodes on D or is on its way there (D has no request
    in flight nor running, P none that will hand off) and D would answer no later than P
    (`idle_decode`: a request arriving during the stall may still hand off into it, so it
    is bounded too); or when waiting for P costs this request more than the stall
    (`prefill_queue`). Either over the bound goes to P then D (`decode_stall`); anything
    else too (`long_uncached`). `max_stall_s` None: D's hop, so that no decode's gap
    exceeds what a hand-off costs."""

    hop_s: float = DEFAULT_HOP_S
    min_prompt_tokens: int = 0  # a floor kept from --pd-min-prompt-tokens
    max_stall_s: float | None = None  # --pd-max-stall-ms (None: D's hop)

    def split(self, request: RequestView, p: InstanceView, d: InstanceView
              ) -> tuple[bool, str]:
        if request.prompt_tokens < self.min_prompt_tokens:
            return False, "short_prompt"
        stall, hop = request.uncached_on(d.url) / d.rate(), d.hop(self.hop_s)
        if stall < hop:
            return False, "small_uncached"
        ttft_p, ttft_d = predicted_ttft(request, p), predicted_ttft(request, d)
        within = stall <= (hop if self.max_stall_s is None else self.max_stall_s)
        # the router's own counts, not D's 0.5 s load lines: a request just sent counts now
        exposed = d.in_flight > 0 or d.running > 0 or p.in_flight > 0
        if not exposed and ttft_d <= ttft_p:  # nothing on D to stall, nor on its way
            return (False, "idle_decode") if within else (True, "decode_stall")
        if ttft_p - ttft_d > stall:
            return (False, "prefill_queue") if within else (True, "decode_stall")
        return True, "long_uncached"


# ---- the policy ----------------------------------------------------------------------------


@dataclass
class Policy:
    """A chooser and a split rule; the decision tree is the same for every policy."""

    name: str
    chooser: Chooser
    splitter: SplitRule
    uses_cache: bool = False  # whether the router must tokenize and look the prompt up

    def pick(self, request: RequestView, candidates: Sequence[InstanceView], stage: Stage
             ) -> InstanceView | None:
        return self.chooser.pick(request, candidates, stage)

    def decide(self, request: RequestView, instances: Sequence[InstanceView]
               ) -> Decision | None:
        by_role = {role: [i for i in instances if role in i.roles] for role in ANY_ROLE}
        prefill, decode = by_role["prefill"], by_role["decode"]
        if prefill and decode:
            return self._pd(request, prefill, decode)
        if by_role["colocated"]:
            inst = self.pick(request, by_role["colocated"], "whole")
            return Decision("colocated", "colocated", whole=inst.url)
        for role in ANY_ROLE:  # no P/D pair, no colocated: any instance serves it whole
            if by_role[role]:
                inst = self.pick(request, by_role[role], "whole")
                return Decision("fallback", f"no_pair_{role}", whole=inst.url)
        return None

    def _pd(self, request: RequestView, prefill: Sequence[InstanceView],
            decode: Sequence[InstanceView]) -> Decision:
        p = self.pick(request, prefill, "prefill")
        if not request.needs_decode:  # P's one token is the whole answer
            return Decision("prefill_only", "one_token", whole=p.url)
        if request.whole_only:  # it prefills the prompt once for every choice
            whole = self.pick(request, decode, "whole")
            return Decision("whole_only", "choices_or_echo", whole=whole.url)
        d = self.pick(request, decode, "decode")
        split, reason = self.splitter.split(request, p, d)
        if split:
            return Decision("disagg", reason, prefill=p.url, decode=d.url)
        whole = self.pick(request, decode, "whole")
        kind = "short_prompt" if reason == "short_prompt" else "whole_on_decode"
        return Decision(kind, reason, whole=whole.url)


POLICIES = ("least_loaded", "round_robin", "cache_aware", "conditional")


def make_policy(name: str, pd_min_prompt_tokens: int = 0, hop_s: float = DEFAULT_HOP_S,
                pd_max_stall_s: float | None = None) -> Policy:
    """The policy of `--routing-policy`: the first three disaggregate prompts of at least
    `pd_min_prompt_tokens`; `conditional` is cache_aware deciding per request, a whole-on-D
    prefill stalling busy decodes at most `pd_max_stall_s` (None: D's measured hop)."""
    fixed = MinPromptSplit(pd_min_prompt_tokens)
    if name == "least_loaded":
        return Policy(name, LeastLoaded(), fixed)
    if name == "round_robin":
        return Policy(name, RoundRobin(), fixed)
    if name == "cache_aware":
        return Policy(name, CacheAware(), fixed, uses_cache=True)
    if name == "conditional":
        return Policy(name, CacheAware(), ConditionalSplit(hop_s, pd_min_prompt_tokens,
                                                                   pd_max_stall_s),
                      uses_cache=True)
    raise ValueError(f"routing policy must be one of {POLICIES}, not {name!r}")
