"""Real processes on loopback for the router tests: `pdserve serve` instances and routers."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pdserve.security import DeploymentSecret, sign_request

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300.0
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@dataclass
class Proc:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL it and everything it started (its engine process)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def free_port(run: int = 1) -> int:
    """A free port (the first of `run` free ones in a row), below the kernel's ephemeral
    range, so that ports the kernel hands out meanwhile (KV sources, clients) cannot take it."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - run)
        try:
            for i in range(run):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port")


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PDSERVE_CPU_THREADS": "1",
            "OMP_NUM_THREADS": "1"}


def spawn(tmp: Path, name: str, *args: str) -> Proc:
    """`python -m pdserve.cli ARGS --port P` in its own process group; not waited for."""
    port = free_port()
    log_path = tmp / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", *args, "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Proc(f"http://127.0.0.1:{port}", proc, log_path)


def wait_healthy(*procs: Proc, timeout_s: float = STARTUP_TIMEOUT_S,
                 ok: tuple[int, ...] = (200,)) -> None:
    """Wait until each answers /health with a status in `ok`."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while True:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.url} exited with {p.proc.returncode}:\n{p.log()}")
            try:
                if httpx.get(p.url + "/health", timeout=2).status_code in ok:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.url} did not become healthy:\n{p.log()}")
            time.sleep(0.3)


def internal(method: str, base: str, path: str, body: dict | None = None,
             content: bytes | None = None, timeout: float = 10) -> httpx.Response:
    """A call signed with the test deployment's secret (tests/conftest.py sets it), as the
    router and the instances make them to each other; `content`: raw bytes instead of JSON."""
    secret = DeploymentSecret.from_env()
    assert secret is not None, "tests/conftest.py sets $PDSERVE_DEPLOYMENT_SECRET"
    if content is None:
        content = b"" if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **sign_request(secret, method, path, content)}
    return httpx.request(method, base + path, content=content, headers=headers, timeout=timeout)


def start_instance(tmp: Path, role: str, *flags: str) -> Proc:
    return spawn(tmp, role, "serve", "--role", role, *flags)


def start_router(tmp: Path, *, prefill=(), decode=(), colocated=(), flags=()) -> Proc:
    args = ["router", *flags]
    for role, procs in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
        for p in procs:
            args += [f"--{role}", p.url]
    router = spawn(tmp, "router", *args)
    wait_healthy(router, timeout_s=60, ok=(200, 503))  # 503: no instance healthy (yet)
    time.sleep(1.5)  # the first health checks of the instances
    return router


def metric(url: str, name: str, **labels: str) -> float:
    """The first sample called `name` with these labels in `url`/metrics (0 if absent)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def blocks_in_use(url: str) -> float:
    return metric(url, "pdserve:kv_blocks_total") - metric(url, "pdserve:kv_blocks_free")


def wait_all_free(*instances: Proc, timeout_s: float = 45.0) -> dict[str, float]:
    """Wait until every instance's block pool is all free; returns what is still in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = {p.url: blocks_in_use(p.url) for p in instances}
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.5)


def sse_events(resp: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(events: list[dict | str], chat: bool) -> str:
    text = ""
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            c = e["choices"][0]
            text += (c["delta"].get("content") or "") if chat else c["text"]
    return text
