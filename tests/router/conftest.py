"""One fleet of real instances for the router tests, started once; routers are cheap and many.

The fleet: two colocated (c0 the reference, c1), two prefill (p0, p1), two decode (d0, d1),
all serving the embedded SmolLM2 in float32 on CPU. Tests that kill an instance run last
and kill only c1, p1 or d1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.router.cluster import Proc, start_instance, start_router, wait_healthy

INSTANCE_FLAGS = ("--max-num-seqs", "128", "--kv-cache-memory", "256MiB")


@dataclass
class Fleet:
    c0: Proc
    c1: Proc
    p0: Proc
    p1: Proc
    d0: Proc
    d1: Proc

    def all(self) -> list[Proc]:
        return [self.c0, self.c1, self.p0, self.p1, self.d0, self.d1]

    def alive(self) -> list[Proc]:
        return [p for p in self.all() if p.proc.poll() is None]

    def layout(self, name: str) -> dict[str, list[Proc]]:
        """`start_router`'s instances for a layout of this fleet: colocated, 1P1D, 2P1D, 1P2D."""
        return {"colocated": {"colocated": [self.c0]},
                "1P1D": {"prefill": [self.p0], "decode": [self.d0]},
                "2P1D": {"prefill": [self.p0, self.p1], "decode": [self.d0]},
                "1P2D": {"prefill": [self.p0], "decode": [self.d0, self.d1]}}[name]

    def routers(self, tmp, names: tuple[str, ...]) -> dict[str, Proc]:
        """A router in front of each named layout of this fleet (stop them when done)."""
        return {name: start_router(tmp, **self.layout(name)) for name in names}


@pytest.fixture(scope="package")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    roles = ("colocated", "colocated", "prefill", "prefill", "decode", "decode")
    procs = [start_instance(tmp, role, *INSTANCE_FLAGS) for role in roles]
    try:
        wait_healthy(*procs)
        yield Fleet(*procs)
    finally:
        for p in procs:  # all at once: each takes a few seconds to wind down
            p.terminate()
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def routers_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("routers")


@pytest.fixture(scope="package")
def slow_lease_prefill(routers_tmp) -> Iterator[Proc]:
    """A prefill instance that holds leases for 600 s: blocks that come back within seconds
    were released on purpose, not by expiry. Tests that use it leave it holding nothing."""
    # --accept-client-kv-requests: the tests also ask it to hold KV directly, as a client
    p = start_instance(routers_tmp, "prefill", "--kv-lease-ttl-s", "600",
                       "--accept-client-kv-requests", *INSTANCE_FLAGS)
    try:
        wait_healthy(p)
        yield p
    finally:
        p.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that kill fleet instances run after every other router test (only ours move)."""
    slots = [i for i, item in enumerate(items) if item.get_closest_marker("kills_instance")
             or "tests/router/" in str(item.path).replace("\\", "/")]
    ours = sorted((items[i] for i in slots),
                  key=lambda item: item.get_closest_marker("kills_instance") is not None)
    for i, item in zip(slots, ours):
        items[i] = item


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kills_instance: kills a fleet instance; runs last")
