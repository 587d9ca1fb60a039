"""The Ray actor behind each server of `pdserve up --ray`: it owns one `pdserve serve` (or
`pdserve router`) process on its node and answers for it.

The server runs as a child process rather than inside the actor because `pdserve serve`
already is the unit that starts, drains and stops an engine (and its shared memory): the
actor adds only what Ray knows and a process does not, that is where it landed (the node's
IP and id) and a port free there. The child gets the deployment secret in its environment,
passed to `start` as an argument (never in the actor's options or runtime_env, which Ray
shows in its dashboard and state API). The child is told to stop (SIGTERM: it drains) when
the actor's process dies, however it dies, so a killed actor or a lost driver leaves no
server behind; the server's engine follows its server (pdserve/lifecycle.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray

from pdserve.launch.procs import free_port
from pdserve.shm import remove_stale_shared_kv_caches

PR_SET_PDEATHSIG = 1  # prctl: the signal this process gets when its parent thread dies


@dataclass
class Placement:
    """Where an actor landed: what the driver learns through Ray."""

    node_ip: str
    node_id: str


@dataclass
class Started:
    """A server the actor started: its URL and where its output goes (on the actor's node)."""

    url: str
    pid: int
    log_path: str


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the actor's process dies (it then drains)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerActor:
    """One `pdserve` server process on this actor's node (a Ray actor class; see
    ray_deploy.py for how it is placed)."""

    def __init__(self, name: str, log_dir: str) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.url = ""

    def placement(self) -> Placement:
        """This actor's node: its IP (the address servers here listen on) and Ray id."""
        ctx = ray.get_runtime_context()
        return Placement(ray.util.get_node_ip_address(), ctx.get_node_id())

    def start(self, args: list[str], env: dict[str, str], host: str,
              port: int | None = None) -> Started:
        """Run `python -m pdserve.cli ARGS --host HOST --port PORT` (PORT: a free one when
        None) with this worker's environment plus `env` (it holds the secret)."""
        port = port or free_port(host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pdserve.cli", *args, "--host", host, "--port", str(port)]
        with open(self.log_path, "ab") as log:
            # run on the actor's thread: PDEATHSIG fires when the thread that forked ends
            self.popen = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=_die_with_parent)
        shown = ray.util.get_node_ip_address() if host in ("", "0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{port}"
        return Started(self.url, self.popen.pid, str(self.log_path))

    def exit_code(self) -> int | None:
        """None while the server runs; its exit code once it ended."""
        return None if self.popen is None else self.popen.poll()

    def healthy(self, ok: tuple[int, ...] = (200,)) -> bool:
        """/health answers with a status in `ok` (a router with no instance yet: 503)."""
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code in ok
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM (the server drains, then stops its engine); SIGKILL its whole group if it
        outlives `timeout_s`; then unlink this node's KV files of engines that are gone."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # stragglers of its group, if any
        except (ProcessLookupError, PermissionError):
            pass
        code = self.popen.wait()
        remove_stale_shared_kv_caches()
        return code
