"""Processes of a deployment: start, wait for health, watch for deaths, stop with no orphans.

Each child runs in its own process group (session), so a Ctrl-C reaches only this launcher,
which then stops the children in order: the router first, then the instances. Each gets
SIGTERM alone and drains (its requests in flight finish, then it stops its engine); what
outlives the drain and a grace is SIGKILLed with its whole group (its engine included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from pdserve.shm import remove_stale_shared_kv_caches

STOP_GRACE_S = 15.0


class ShutdownRequested(Exception):
    """SIGINT or SIGTERM arrived."""


@dataclass
class Proc:
    """One child process: an instance or the router."""

    name: str
    role: str
    url: str
    devices: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    wave: int = 0  # started once every process of the earlier waves is healthy
    popen: subprocess.Popen | None = None
    reported_dead: bool = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.cmd, env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """Signal the process alone (its engine is its to stop, after draining)."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)  # the session leader's pid is its group id
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Deployment:
    """All processes of one `pdserve up`, in start order (instances, then the router)."""

    procs: list[Proc]
    console: Console = field(default_factory=Console)

    @property
    def router(self) -> Proc:
        return self.procs[-1]

    @property
    def instances(self) -> list[Proc]:
        return self.procs[:-1]

    def start(self, timeout_s: float) -> None:
        """Start wave by wave, each healthy before the next; raise if one dies or times out."""
        deadline = time.monotonic() + timeout_s
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            for wave in sorted({p.wave for p in self.procs}):
                procs = [p for p in self.procs if p.wave == wave]
                for proc in procs:
                    proc.start()
                self._wait_healthy(procs, deadline, timeout_s, progress)

    def _wait_healthy(self, procs: list[Proc], deadline: float, timeout_s: float,
                      progress: Progress) -> None:
        waiting = list(procs)
        tasks = {p.name: progress.add_task(f"{p.name} starting at {p.url}", total=1)
                 for p in procs}
        while waiting:
            for proc in list(waiting):
                if not proc.alive():
                    raise RuntimeError(self.death_message(proc, "while starting"))
                if proc.healthy():
                    waiting.remove(proc)
                    progress.update(tasks[proc.name], completed=1,
                                    description=f"{proc.name} ready at {proc.url}")
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                raise RuntimeError(f"not healthy after {timeout_s:.0f} s: {names}")
            time.sleep(0.5)

    def death_message(self, proc: Proc, when: str = "") -> str:
        code = proc.popen.returncode if proc.popen else None
        tail = "".join(f"\n  | {line}" for line in proc.log_tail().splitlines())
        head = " ".join(filter(None, [f"{proc.name} (pid {proc.pid}, {proc.url}) exited "
                                      f"with code {code}", when]))
        return f"{head}\n  log: {proc.log_path}{tail}"

    def watch(self, on_death: Callable[[Proc], None], interval_s: float = 0.5) -> None:
        """Report each death once; return when the router or every instance is gone."""
        while True:
            for proc in self.procs:
                if not proc.alive() and not proc.reported_dead:
                    proc.reported_dead = True
                    on_death(proc)
            if not self.router.alive() or not any(p.alive() for p in self.instances):
                return
            time.sleep(interval_s)

    def hurry(self) -> None:
        """A second SIGTERM to every server still running: each ends its drain at once."""
        for proc in self.procs:
            proc.signal(signal.SIGTERM)

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Router first (it drains: no new requests, those in flight finish), then the
        instances (each drains, then stops its engine); SIGKILL whatever outlives the drain
        and the grace; last, unlink the shared memory of engines that could not."""
        for group in ([self.router], self.instances):
            for proc in group:
                proc.signal(signal.SIGTERM)  # not the group: the engine must outlive the drain
            deadline = time.monotonic() + drain_timeout_s + STOP_GRACE_S
            for proc in group:
                if proc.popen is None:
                    continue
                try:
                    proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    pass
                proc.signal_group(signal.SIGKILL)  # stragglers in its group, if any
                proc.popen.wait()
        remove_stale_shared_kv_caches()


def free_port(host: str) -> int:
    """A port nothing listens on now on `host` (the kernel's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ports_in_use(ports: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Those of (name, host, port) that cannot be listened on now (another server has them)."""
    taken = []
    for name, host, port in ports:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((host, port))
            except OSError:
                taken.append((name, host, port))
    return taken


def raise_on_signals(on_repeat: Callable[[], None] | None = None) -> None:
    """SIGINT and SIGTERM become ShutdownRequested in the main thread; a later one calls
    `on_repeat` instead (it must not cut the cleanup short)."""

    def again(signum, frame) -> None:
        if on_repeat is not None:
            on_repeat()

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)
        raise ShutdownRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
