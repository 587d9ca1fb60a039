"""`pdserve up --ray`: 1P1D on a Ray cluster of two nodes on this machine, P pinned to one
node and D to the other by custom resources: greedy text equal to a colocated instance's,
KV over TCP (the nodes are two hosts to pdserve), deaths reported, nothing left after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdserve.security import SECRET_ENV
from pdserve.shm import SHM_DIR, SHM_PREFIX, owner_pid
from tests.launch.test_up import alive, descendants
from tests.router.cluster import (
    GREEDY,
    Proc,
    env,
    free_port,
    internal,
    metric,
    start_instance,
    wait_healthy,
)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pdserve[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
READY = "- ready"
PROMPTS = ["The capital of France is",
           "Write a short story about a robot who learns to paint, in three sentences:"]


@dataclass
class RayUp:
    cluster: Cluster
    proc: subprocess.Popen
    out_path: Path
    colocated: Proc
    shm_before: set[str]

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        pytest.fail(f"no {pattern!r} in pdserve up's output:\n{self.output()[-3000:]}")

    @property
    def url(self) -> str:
        return self.wait_for(r"serving at (\S+)/v1", 0).group(1)

    def row(self, name: str) -> list[str]:
        """The table's row of `name`: name, role, URL, node, reserves, PID, log."""
        line = next(ln for ln in self.output().splitlines() if ln.startswith(f"│ {name} "))
        return [cell.strip() for cell in line.strip("│").split("│")]


def node_ids_by_resource() -> dict[str, str]:
    return {res: n["NodeID"] for n in ray.nodes() if n["Alive"]
            for res in ("node_p", "node_d") if res in n["Resources"]}


@pytest.fixture(scope="module")
def ray_up(tmp_path_factory) -> Iterator[RayUp]:
    tmp = tmp_path_factory.mktemp("ray")
    shm_before = set(os.listdir(SHM_DIR))
    saved = dict(os.environ)
    os.environ.update(env())  # the raylets (and so the actors and servers) import this pdserve
    # the nodes must not inherit the secret: the servers get it from `pdserve up` through Ray
    secret = os.environ.pop(SECRET_ENV)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "resources": {"node_p": 1}})
    proc = None
    colocated = start_instance(tmp, "colocated", "--device", "cpu")
    try:
        cluster.add_node(num_cpus=2, resources={"node_d": 1})
        cluster.wait_for_nodes()
        os.environ[SECRET_ENV] = secret
        out_path = tmp / "up.out"
        cmd = [sys.executable, "-m", "pdserve.cli", "up", "--ray", cluster.address,
               "--port", str(free_port()), "--log-dir", str(tmp / "logs"),
               "--ray-resources", "prefill=node_p:1", "--ray-resources", "decode=node_d:1"]
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), "COLUMNS": "250"}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        up = RayUp(cluster, proc, out_path, colocated, shm_before)
        up.wait_for(READY, timeout_s=240)
        wait_healthy(colocated)
        ray.init(address=cluster.address, namespace="pdserve", log_to_driver=False)
        yield up
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        colocated.stop()
        ray.shutdown()
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def completion(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 12, **GREEDY}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_prefill_and_decode_run_on_the_nodes_their_resources_pin(ray_up):
    nodes = node_ids_by_resource()
    for name, resource in (("prefill-0", "node_p"), ("decode-0", "node_d")):
        pid = int(ray_up.row(name)[5])
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PDSERVE_HOST_ID={nodes[resource]}".encode() in environ, name
        # the nodes were started without it: it came with the actor's start call
        assert f"{SECRET_ENV}={os.environ[SECRET_ENV]}".encode() in environ, name


def test_greedy_text_through_the_router_equals_colocated_and_kv_crossed_over_tcp(ray_up):
    decode_url = ray_up.row("decode-0")[2]
    for prompt in PROMPTS:
        assert completion(ray_up.url, prompt) == completion(ray_up.colocated.url, prompt)
    by_transport = "pdserve:kv_pulls_by_transport_total"
    assert metric(decode_url, by_transport, transport="tcp") == len(PROMPTS)
    assert metric(decode_url, by_transport, transport="host") == 0
    assert metric(ray_up.url, "pdserve_router:requests_total", kind="disagg") == len(PROMPTS)


def test_a_killed_actor_is_reported_and_its_server_dropped(ray_up):
    pid = int(ray_up.row("decode-0")[5])
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].endswith("-decode-0"))
    ray.kill(ray.get_actor(name, namespace="pdserve"))
    ray_up.wait_for(r"decode-0 \(pid \d+ on node \S+, \S+\) its Ray actor died", 30)
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:  # it drains, then stops
        time.sleep(0.2)
    assert not alive(pid), "the server outlived its actor"
    deadline = time.monotonic() + 30  # the router's heartbeat TTL is 10 s
    while time.monotonic() < deadline:
        urls = [i["url"] for i in internal("GET", ray_up.url, "/instances").json()["instances"]]
        if ray_up.row("decode-0")[2] not in urls:
            break
        time.sleep(0.5)
    assert urls == [ray_up.row("prefill-0")[2]]


def test_ctrl_c_leaves_no_process_actor_placement_group_or_shared_memory(ray_up):
    servers = [int(ray_up.row(name)[5]) for name in ("prefill-0", "decode-0", "router")]
    pids = set(servers).union(*(descendants(p) for p in servers))  # engines included
    kv_files = [f for f in os.listdir(SHM_DIR) if f.startswith(SHM_PREFIX)
                and owner_pid(f) in pids]
    assert kv_files, "P's KV caches live in shared memory on CPU"
    ray_up.proc.send_signal(signal.SIGINT)
    assert ray_up.proc.wait(timeout=90) == 0
    assert "pdserve up: stopped" in ray_up.output()
    assert not [p for p in pids if alive(p)]
    from ray._private.state import state

    assert [a["Name"] for a in state.actor_table(None).values() if a["State"] != "DEAD"] == []
    assert {g["state"] for g in ray.util.placement_group_table().values()} == {"REMOVED"}
    left = set(os.listdir(SHM_DIR))
    assert [f for f in kv_files if f in left] == []
    # Ray's own files (another test's may come and go meanwhile: only Ray's are checked)
    assert [f for f in left - ray_up.shm_before if "ray" in f.lower() or "plasma" in f] == []


def test_the_deployment_secret_is_in_no_log(ray_up):
    secret = os.environ["PDSERVE_DEPLOYMENT_SECRET"].encode()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [*session.rglob("*"), *ray_up.out_path.parent.rglob("*")]
    assert [str(f) for f in logs if f.is_file() and secret in f.read_bytes()] == []
