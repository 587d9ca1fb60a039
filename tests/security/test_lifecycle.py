"""Issue 12, finding 8: lifecycle without leftovers, with real processes.

An engine dies with its server (kill -9 included) and takes its /dev/shm file with it;
`pdserve up` stopped by SIGINT or SIGTERM leaves no process and no shared memory; SIGTERM
drains (streams finish, new requests get 503 with Retry-After); Ctrl-C prints no
traceback; `pdserve up` refuses ports in use before starting anything.

Other tests may run at the same time: only processes (and their /dev/shm files) that these
tests started are counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from pdserve.shm import SHM_DIR, SHM_PREFIX, remove_stale_shared_kv_caches
from tests.router.cluster import REPO, Proc, env, free_port, wait_healthy

SECRET = {"PDSERVE_DEPLOYMENT_SECRET": "lifecycle-tests-" + "0" * 32}
GONE_WITHIN_S = 5.0
LONG = {"prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True,
        "temperature": 0.0, "stream": True}


def start(tmp: Path, name: str, *args: str, port: int | None = None) -> Proc:
    """`python -m pdserve.cli ARGS --port P` in its own session (as from a terminal)."""
    port = port or free_port()
    log_path = tmp / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", *args, "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), **SECRET}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(f"http://127.0.0.1:{port}", proc, log_path)


def serve(tmp: Path, name: str, *flags: str) -> Proc:
    return start(tmp, name, "serve", "--device", "cpu", "--kv-cache-memory", "64MiB", *flags)


def engine_pid(p: Proc) -> int:
    return httpx.get(p.url + "/health", timeout=10).json()["engine_pid"]


def shm_files_of(pids: set[int]) -> list[str]:
    return [e for e in os.listdir(SHM_DIR)
            if e.startswith(SHM_PREFIX) and e[len(SHM_PREFIX):].split("-")[0] in map(str, pids)]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: set[int], timeout_s: float = GONE_WITHIN_S) -> set[int]:
    """Wait until no pid runs and none has a /dev/shm file; returns those still there."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {p for p in pids if running(p)} | {
            int(f[len(SHM_PREFIX):].split("-")[0]) for f in shm_files_of(pids)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def cleanup(*procs: Proc) -> None:
    for p in procs:
        for child in _descendants(p.proc.pid):
            child.kill()
        p.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass
class Stream:
    """A streamed completion read on a thread: its SSE events, once it ended."""

    url: str
    body: dict
    headers: dict[str, str] = field(default_factory=dict)
    events: list = field(default_factory=list)
    first: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> Stream:
        threading.Thread(target=self._read, daemon=True).start()
        assert self.first.wait(120), "no first event"
        return self

    def _read(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body,
                              timeout=120) as resp:
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.first.set()
            self.done.set()

    def finish_reason(self) -> str | None:
        reasons = [c.get("finish_reason") for e in self.events if isinstance(e, dict)
                   for c in e.get("choices", [])]
        return next((r for r in reasons if r), None)


def assert_refused_while_draining(url: str) -> None:
    resp = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                      timeout=30)
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("retry-after")
    assert resp.json()["error"]["code"] == "draining"
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"


# ---- an engine dies with its server ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_prefill_servers(tmp_path_factory) -> Iterator[tuple[Proc, Proc]]:
    """Prefill instances: their engines keep the KV caches in a /dev/shm file."""
    tmp = tmp_path_factory.mktemp("kill9")
    procs = (serve(tmp, "p0", "--role", "prefill"), serve(tmp, "p1", "--role", "prefill"))
    try:
        wait_healthy(*procs)
        yield procs
    finally:
        cleanup(*procs)


def test_kill_9_of_a_busy_server_takes_its_engine_and_shared_memory_along(two_prefill_servers):
    server = two_prefill_servers[0]
    engine = engine_pid(server)
    assert shm_files_of({engine}), "a prefill engine on CPU keeps its caches in /dev/shm"
    stream = Stream(server.url, LONG).start()  # the engine is mid-generation, its pipe filling
    os.kill(server.proc.pid, signal.SIGKILL)  # the server alone, as the OOM killer would
    server.proc.wait()
    assert stream.done.wait(30)
    assert not wait_gone({engine}), f"engine {engine} outlived its server: {shm_files_of({engine})}"


def test_kill_9_of_an_engine_its_server_unlinks_the_shared_memory(two_prefill_servers):
    server = two_prefill_servers[1]
    engine = engine_pid(server)
    assert shm_files_of({engine})
    os.kill(engine, signal.SIGKILL)
    assert not wait_gone({engine}), f"left behind: {shm_files_of({engine})}"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503  # engine_dead


def test_kill_9_of_a_tensor_parallel_server_takes_every_rank_along(tmp_path):
    server = serve(tmp_path, "tp", "--role", "prefill", "--tensor-parallel-size", "3")
    try:
        wait_healthy(server, timeout_s=600)  # three ranks load on a shared 2-core machine
        ranks = {p.pid for p in _descendants(server.proc.pid)
                 if "resource_tracker" not in " ".join(p.cmdline())}
        assert len(ranks) == 3 and engine_pid(server) in ranks  # rank 0 and its workers
        Stream(server.url, LONG).start()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        assert not wait_gone(ranks), f"outlived their server: {ranks}"
    finally:
        cleanup(server)


def test_files_of_dead_processes_are_removed_at_start_and_no_others():
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    zombie = subprocess.Popen(["true"])  # exited, not reaped: holds no mapping either
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    paths = {pid: os.path.join(SHM_DIR, f"{SHM_PREFIX}{pid}-lifecycle-test")
             for pid in (dead.pid, zombie.pid, os.getpid())}
    for path in paths.values():
        open(path, "wb").close()
    try:
        remove_stale_shared_kv_caches()
        assert [pid for pid, path in paths.items() if os.path.exists(path)] == [os.getpid()]
    finally:
        zombie.wait()
        for path in paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# ---- SIGTERM drains; Ctrl-C is quiet --------------------------------------------------------


def test_sigterm_lets_streams_finish_and_refuses_new_work(tmp_path):
    server = serve(tmp_path, "c0", "--drain-timeout", "120")
    try:
        wait_healthy(server)
        engine = engine_pid(server)
        short = Stream(server.url, {**LONG, "max_tokens": 24}).start()
        long = Stream(server.url, LONG).start()
        os.killpg(server.proc.pid, signal.SIGTERM)  # the whole group, as systemd does
        time.sleep(0.5)
        assert_refused_while_draining(server.url)
        assert short.done.wait(120), "the short stream did not finish during the drain"
        assert short.error is None and short.finish_reason() == "length"
        assert short.events[-1] == "[DONE]"
        assert not long.done.is_set() and server.proc.poll() is None  # still draining
        os.kill(server.proc.pid, signal.SIGTERM)  # a second signal ends the drain now
        assert long.done.wait(30)
        assert long.error is None and long.events[-1] == "[DONE]"
        assert long.events[-2]["error"]["code"] == "draining"  # cut, and told so
        assert server.proc.wait(timeout=30) == 0
        assert not wait_gone({engine})
        assert "Traceback" not in server.log()
    finally:
        cleanup(server)


def test_ctrl_c_exits_quietly(tmp_path):
    server = serve(tmp_path, "c1")
    try:
        wait_healthy(server)
        engine = engine_pid(server)
        os.killpg(server.proc.pid, signal.SIGINT)  # a terminal sends it to the whole group
        assert server.proc.wait(timeout=60) == 0
        assert not wait_gone({engine})
        log = server.log()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    finally:
        cleanup(server)


def test_router_drains_then_cuts_streams_at_the_drain_timeout(tmp_path):
    instance = serve(tmp_path, "c2")
    router = None
    try:
        wait_healthy(instance)
        router = start(tmp_path, "router", "router", "--colocated", instance.url,
                       "--drain-timeout", "2")
        wait_healthy(router, timeout_s=60)
        stream = Stream(router.url, LONG).start()
        router.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert_refused_while_draining(router.url)
        assert stream.done.wait(30), "the drain timeout did not end the stream"
        assert stream.error is None and stream.events[-1] == "[DONE]"
        assert stream.events[-2]["error"]["code"] == "draining"
        assert router.proc.wait(timeout=30) == 0
        assert httpx.get(instance.url + "/health", timeout=10).status_code == 200
    finally:
        cleanup(*[p for p in (router, instance) if p is not None])


# ---- pdserve up ------------------------------------------------------------------------------


def start_up(tmp: Path, port: int, *flags: str) -> subprocess.Popen:
    out = open(tmp / "up.out", "wb")  # noqa: SIM115 (the child writes it; closed with tmp)
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--cpu", "--port", str(port),
           "--kv-cache-memory", "64MiB", "--log-dir", str(tmp / "logs"), *flags]
    return subprocess.Popen(cmd, cwd=REPO, env={**env(), **SECRET, "COLUMNS": "200"},
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(up: subprocess.Popen, tmp: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while "- ready" not in (tmp / "up.out").read_text(errors="replace"):
        if up.poll() is not None or time.monotonic() > deadline:
            pytest.fail((tmp / "up.out").read_text(errors="replace")[-3000:])
        time.sleep(0.3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_stopped_leaves_no_process_and_no_shared_memory(tmp_path, sig):
    port = free_port(run=3)
    up = start_up(tmp_path, port, "--drain-timeout", "120")
    try:
        wait_ready(up, tmp_path)
        pids = {p.pid for p in psutil.Process(up.pid).children(recursive=True)}
        assert shm_files_of(pids)  # the engines keep their KV caches in /dev/shm
        stream = Stream(f"http://127.0.0.1:{port}", {**LONG, "max_tokens": 24}).start()
        up.send_signal(sig)
        assert stream.done.wait(180), "the stream did not finish during the stop"
        assert stream.error is None and stream.finish_reason() == "length"
        assert stream.events[-1] == "[DONE]"
        assert up.wait(timeout=180) == 0
        assert not wait_gone(pids), (tmp_path / "up.out").read_text()
    finally:
        if up.poll() is None:
            for child in _descendants(up.pid):
                child.kill()
            up.kill()
        up.wait()


def test_up_refuses_ports_in_use_before_starting_anything(tmp_path):
    port = free_port(run=3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 2))  # the decode instance's port
        taken.listen()
        started = time.monotonic()
        up = start_up(tmp_path, port)
        try:
            code = up.wait(timeout=60)
        finally:
            if up.poll() is None:
                up.kill()
    out = (tmp_path / "up.out").read_text()
    assert code != 0 and time.monotonic() - started < 30
    assert f"{port + 2}" in out and "in use" in out and "--port" in out
    assert not (tmp_path / "logs").exists()  # no instance was started
