"""`pdserve up` with no layout arguments: 1P1D on the CPU, the router in front, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.router.cluster import env, free_port, internal, metric

REPO = Path(__file__).resolve().parents[2]
READY = "- ready"


@dataclass
class Up:
    proc: subprocess.Popen
    out_path: Path
    url: str

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        pytest.fail(f"no {text!r} in pdserve up's output:\n{self.output()[-3000:]}")


def start_up(tmp: Path, *flags: str) -> Up:
    """`pdserve up *flags` in its own session, its output in a file, logs under `tmp`."""
    port = free_port(run=3)  # the router's, then one per instance
    out_path = tmp / "up.out"
    cmd = [sys.executable, "-m", "pdserve.cli", "up", *flags, "--port", str(port),
           "--log-dir", str(tmp / "logs")]
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), "COLUMNS": "200"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Up(proc, out_path, f"http://127.0.0.1:{port}")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, their engine processes, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[Up]:
    deployment = start_up(tmp_path_factory.mktemp("up"))
    proc = deployment.proc
    try:
        deployment.wait_for(READY, timeout_s=300)
        yield deployment
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
        proc.wait()


def test_table_shows_what_runs_where(up):
    out = up.output()
    for name in ("prefill-0", "decode-0", "router"):
        assert name in out
    assert "cpu" in out and up.url in out


def test_chat_goes_through_the_router_to_separate_prefill_and_decode(up):
    instances = internal("GET", up.url, "/instances").json()["instances"]
    by_role = {i["role"]: i["url"] for i in instances}
    assert set(by_role) == {"prefill", "decode"}
    pids = {role: httpx.get(url + "/health", timeout=10).json()["engine_pid"]
            for role, url in by_role.items()}
    assert pids["prefill"] != pids["decode"]
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0.0}
    resp = httpx.post(up.url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    assert metric(up.url, "pdserve_router:requests_total", kind="disagg") == 1
    for url in by_role.values():
        assert metric(url, "vllm:request_success_total", finished_reason="length") == 1


def test_a_dying_instance_is_reported(up):
    decode_url = next(i["url"] for i in internal("GET", up.url, "/instances")
                      .json()["instances"] if i["role"] == "decode")
    port = decode_url.rsplit(":", 1)[1]
    victim = next(pid for pid in descendants(up.proc.pid)
                  if f"--port\0{port}" in Path(f"/proc/{pid}/cmdline").read_text())
    os.killpg(victim, signal.SIGKILL)
    out = up.wait_for("decode-0 (pid", timeout_s=30)
    assert "exited with code -9" in out


def test_sigterm_stops_everything_with_no_orphans(up):
    children = descendants(up.proc.pid)
    assert len(children) >= 2  # prefill (and its engine) and the router are still up
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=60) == 0
    assert "stopped" in up.output()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.2)
    assert not [p for p in children if alive(p)]
