"""The simulator's router step: pick instance(s) for a request from the instances' loads.

A small interface of the planner's own (`Picker.pick(prompt, max_tokens, loads) -> Route`,
`Picker.pick_decode(loads)` once P answered) that
mirrors what pdserve/router does today (router/pairing.py `least_loaded`, router/proxy.py
`Router.route`): the fewest outstanding tokens wins (ties: fewest requests, then name); a
prompt shorter than `pd_min_prompt_tokens` is served whole, on a decode instance first. The
router's pure `RoutingPolicy` object, once it exists, can stand behind this interface: an
adapter that turns `InstanceLoad`s into its view of instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

ANY_ROLE = ("decode", "colocated", "prefill")  # whole on one instance: decode ones first


@dataclass
class InstanceLoad:
    """What the router counts of one instance (router/pairing.py `Charge`)."""

    name: str
    role: str
    outstanding_tokens: int = 0
    in_flight: int = 0


@dataclass
class Route:
    """Whole on `whole`, or prefill on `prefill` then decode on `decode`."""

    whole: str | None = None
    prefill: str | None = None
    decode: str | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class Picker(Protocol):
    def pick(self, prompt_tokens: int, max_tokens: int, loads: list[InstanceLoad]) -> Route:
        """Where a request of `prompt_tokens` generating up to `max_tokens` runs (for P/D,
        the decode instance named is a hint: D is picked again when P answers)."""
        ...

    def pick_decode(self, loads: list[InstanceLoad]) -> str:
        """The decode instance for a request P has prefilled."""
        ...


def least_loaded(loads: list[InstanceLoad], role: str) -> InstanceLoad | None:
    pool = [i for i in loads if i.role == role]
    return min(pool, key=lambda i: (i.outstanding_tokens, i.in_flight, i.name), default=None)


@dataclass
class LeastLoadedPicker:
    """Today's router: least-loaded pairing, conditional disaggregation by prompt length."""

    pd_min_prompt_tokens: int = 0

    def pick(self, prompt_tokens: int, max_tokens: int, loads: list[InstanceLoad]) -> Route:
        p, d = least_loaded(loads, "prefill"), least_loaded(loads, "decode")
        if p is not None and d is not None and max_tokens > 1 \
                and prompt_tokens >= self.pd_min_prompt_tokens:
            # D is picked when P answers (router/proxy.py); the simulator asks again then
            return Route(prefill=p.name, decode=d.name)
        roles = ANY_ROLE if p is not None and d is not None else ("colocated", *ANY_ROLE)
        for role in roles:
            inst = least_loaded(loads, role)
            if inst is not None:
                return Route(whole=inst.name)
        raise ValueError("no instance can serve the request")

    def pick_decode(self, loads: list[InstanceLoad]) -> str:
        """The decode instance for a prefilled request, picked once P has answered."""
        d = least_loaded(loads, "decode")
        if d is None:
            raise ValueError("no decode instance")
        return d.name
