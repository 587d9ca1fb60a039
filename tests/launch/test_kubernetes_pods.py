"""The rendered pods' commands, run as real processes on loopback the way the kubelet runs
them: $(POD_IP) filled in, the cluster's DNS name of the router's internal Service resolved,
the Secret mounted as a file. The instance registers itself; the router turns ready."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pdserve.launch.kubernetes import SECRET_DIR, KubeOptions, render
from pdserve.launch.layout import Layout
from pdserve.security import SECRET_ENV, DeploymentSecret, sign_request
from tests.router.cluster import REPO, Proc, env, free_port, wait_healthy

FILE_SECRET = "k8s-test-secret-from-a-mounted-file-0123456789"  # not the environment's


def pod_args(args: list[str], port: int, dns: dict[str, str], secret_dir: Path) -> list[str]:
    """What the kubelet and the cluster would make of a container's args on this machine."""
    out = []
    for arg in args:
        for name, address in dns.items():
            arg = arg.replace(name, address)
        arg = arg.replace("$(POD_IP):8000", f"127.0.0.1:{port}").replace("$(POD_IP)",
                                                                         "127.0.0.1")
        arg = arg.replace(SECRET_DIR, str(secret_dir))
        out.append(arg)
    out[out.index("--host") + 1] = "127.0.0.1"  # loopback only on a test machine
    out[out.index("--port") + 1] = str(port)
    return out


def start(tmp: Path, name: str, args: list[str], port: int,
          extra_env: dict[str, str] | None = None) -> Proc:
    child_env = {k: v for k, v in env().items() if k != SECRET_ENV}  # only the file
    child_env.update(extra_env or {})
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], cwd=REPO,
                                env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Proc(f"http://127.0.0.1:{port}", proc, log_path)


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("k8s-pods")
    (tmp / "deployment-secret").write_text(FILE_SECRET)
    objects = render(Layout(colocated=1, cpu=True), KubeOptions(cpus_per_rank=1))
    deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                   for d in objects if d["kind"] == "Deployment"}
    router_port, instance_port = free_port(), free_port()
    dns = {"pdserve-router-internal:8000": f"127.0.0.1:{router_port}"}
    router = start(tmp, "router", pod_args(deployments["pdserve-router"]["args"], router_port,
                                           dns, tmp), router_port)
    started = [router]
    try:
        wait_healthy(router, timeout_s=60, ok=(200, 503))
        not_ready = httpx.get(router.url + "/health", timeout=5).status_code
        instance = start(tmp, "colocated", pod_args(deployments["pdserve-colocated"]["args"],
                                                    instance_port, dns, tmp), instance_port)
        started.append(instance)
        wait_healthy(instance)
        yield router, instance, not_ready
    finally:
        for p in reversed(started):
            p.stop()


def test_the_router_listens_but_is_not_ready_before_an_instance_registers(pods):
    router, _, not_ready = pods
    assert not_ready == 503  # readiness /health: no traffic yet; liveness (TCP) holds
    with socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])), timeout=5):
        pass


def test_the_instance_registers_under_its_pod_address_and_the_router_serves(pods):
    router, instance, _ = pods
    deadline = time.monotonic() + 30
    while httpx.get(router.url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, router.log()
        time.sleep(0.5)
    secret = DeploymentSecret.from_text(FILE_SECRET)
    listed = httpx.get(router.url + "/instances", timeout=5,
                       headers=sign_request(secret, "GET", "/instances")).json()
    assert [(i["url"], i["role"]) for i in listed["instances"]] == [(instance.url, "colocated")]
    resp = httpx.post(router.url + "/v1/completions", timeout=120, json={
        "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
