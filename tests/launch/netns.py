"""Two network namespaces joined by a veth pair: two hosts on one machine, for the cross-host
KV path (tests/launch/test_netns.py, benchmarks/bench_cross_host_kv.py).

Addresses are 10.250.N.1 (side "p") and 10.250.N.2 (side "d") inside the namespaces only:
nothing is routed to or from the root namespace, so this traffic never leaves the machine.
The caller enters a namespace for one thread (`inside`) to talk to a server there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000


class NetnsUnavailable(Exception):
    """Namespaces cannot be made here; the message says why (for a skip)."""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@dataclass
class NetnsPair:
    """Namespaces `<tag>-p` and `<tag>-d`, a veth pair between them, addresses set, links up."""

    tag: str = field(default_factory=lambda: f"pdsrv{uuid.uuid4().hex[:6]}")
    subnet: int = field(default_factory=lambda: random.randrange(1, 255))
    made: list[str] = field(default_factory=list)

    def address(self, side: str) -> str:
        return f"10.250.{self.subnet}.{1 if side == 'p' else 2}"

    def ns(self, side: str) -> str:
        return f"{self.tag}-{side}"

    def create(self) -> NetnsPair:
        """Make both; NetnsUnavailable with the exact reason where this machine refuses."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (euid is not 0)")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("`ip` (iproute2) is not installed")
        try:
            for side in ("p", "d"):
                self._run("netns", "add", self.ns(side))
                self.made.append(self.ns(side))
            self._run("link", "add", f"{self.tag}p", "type", "veth", "peer", "name",
                      f"{self.tag}d")
            for side in ("p", "d"):
                dev, ns = f"{self.tag}{side}", self.ns(side)
                self._run("link", "set", dev, "netns", ns)
                self._run("-n", ns, "addr", "add", f"{self.address(side)}/24", "dev", dev)
                self._run("-n", ns, "link", "set", dev, "up")
                self._run("-n", ns, "link", "set", "lo", "up")
        except NetnsUnavailable:
            self.delete()
            raise
        return self

    def _run(self, *args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")

    def command(self, side: str, cmd: list[str]) -> list[str]:
        """`cmd` run inside the namespace of `side`."""
        return ["ip", "netns", "exec", self.ns(side), *cmd]

    @contextlib.contextmanager
    def inside(self, side: str) -> Iterator[None]:
        """This thread in the namespace of `side` (sockets made meanwhile stay there)."""
        libc = ctypes.CDLL(None, use_errno=True)
        link = f"/proc/self/task/{threading.get_native_id()}/ns/net"
        before = os.readlink(link)
        home = os.open(link, os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns(side)}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into " + self.ns(side))
            yield
        finally:
            back = libc.setns(home, CLONE_NEWNET)
            os.close(target)
            os.close(home)
            # never go on in the wrong namespace: 10.250/16 outside ours is the default route
            if back != 0 or os.readlink(link) != before:
                raise RuntimeError("could not return to the root network namespace")

    def delete(self) -> None:
        """Remove both namespaces (their veth ends go with them)."""
        for ns in self.made:
            _ip("netns", "del", ns)
        self.made.clear()

    def exists(self) -> bool:
        listed = _ip("netns", "list").stdout
        return any(self.ns(side) in listed for side in ("p", "d"))
