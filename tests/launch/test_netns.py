"""The real two-host path on one machine: P in one network namespace, D in another, joined
by a veth pair; the router in P's namespace. KV crosses the veth over TCP; greedy text is
that of a colocated instance; nothing is left after (namespaces, processes, shared memory).
Skipped, with the reason, where namespaces cannot be made (not root, no `ip`, refused)."""

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

from pdserve.shm import SHM_DIR, SHM_PREFIX, owner_pid
from tests.launch.netns import NetnsPair, NetnsUnavailable
from tests.launch.test_up import alive, descendants
from tests.router.cluster import GREEDY, Proc, env, metric, start_instance, wait_healthy

PORT = 8100  # each namespace has its own ports: nothing else listens there
ROUTER_PORT = 8000


@dataclass
class TwoHosts:
    net: NetnsPair
    prefill: Proc
    decode: Proc
    router: Proc
    colocated: Proc


def spawn_in(net: NetnsPair, side: str, tmp: Path, name: str, args: list[str],
             host_id: str) -> Proc:
    """`pdserve ARGS` inside the namespace of `side`, in its own process group."""
    log_path = tmp / f"{name}.log"
    cmd = net.command(side, [sys.executable, "-m", "pdserve.cli", *args])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env={**env(), "PDSERVE_HOST_ID": host_id}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    port = args[args.index("--port") + 1]
    return Proc(f"http://{net.address(side)}:{port}", proc, log_path)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Iterator[TwoHosts]:
    tmp = tmp_path_factory.mktemp("netns")
    try:
        net = NetnsPair().create()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces not permitted here: {exc}")
    procs: list[Proc] = []
    try:
        p_addr, d_addr = net.address("p"), net.address("d")
        procs.append(start_instance(tmp, "colocated", "--device", "cpu"))
        for side, role in (("p", "prefill"), ("d", "decode")):
            procs.append(spawn_in(net, side, tmp, role, [
                "serve", "--role", role, "--device", "cpu", "--host", net.address(side),
                "--port", str(PORT)], host_id=f"netns-{side}"))
        procs.append(spawn_in(net, "p", tmp, "router", [
            "router", "--host", p_addr, "--port", str(ROUTER_PORT),
            "--prefill", f"http://{p_addr}:{PORT}", "--decode", f"http://{d_addr}:{PORT}"],
            host_id="netns-p"))
        colocated, prefill, decode, router = procs
        wait_healthy(colocated)
        with net.inside("p"):  # the router and P answer only inside P's namespace
            wait_healthy(prefill, decode, router)
        yield TwoHosts(net, prefill, decode, router, colocated)
    finally:
        for p in procs:
            p.stop()
        net.delete()


def completion(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 12, **GREEDY}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_greedy_text_across_the_veth_equals_colocated_over_tcp(two_hosts):
    prompts = ["The capital of France is",
               "Write a short story about a robot who learns to paint, in three sentences:"]
    want = [completion(two_hosts.colocated.url, p) for p in prompts]
    with two_hosts.net.inside("p"):
        assert [completion(two_hosts.router.url, p) for p in prompts] == want
        by_transport = "pdserve:kv_pulls_by_transport_total"
        assert metric(two_hosts.decode.url, by_transport, transport="tcp") == len(prompts)
        assert metric(two_hosts.decode.url, by_transport, transport="host") == 0


def test_stopping_leaves_no_namespace_process_or_shared_memory(two_hosts):
    servers = [p.proc.pid for p in (two_hosts.prefill, two_hosts.decode, two_hosts.router)]
    pids = set(servers).union(*(descendants(p) for p in servers))
    kv_files = [f for f in os.listdir(SHM_DIR) if f.startswith(SHM_PREFIX)
                and owner_pid(f) in pids]
    assert kv_files, "P's KV caches live in shared memory on CPU"
    for p in (two_hosts.router, two_hosts.prefill, two_hosts.decode):
        p.proc.send_signal(signal.SIGTERM)
    for p in (two_hosts.router, two_hosts.prefill, two_hosts.decode):
        assert p.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
    left = set(os.listdir(SHM_DIR))
    assert [f for f in kv_files if f in left] == []
    two_hosts.net.delete()
    assert not two_hosts.net.exists()
