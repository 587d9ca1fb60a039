"""Fixtures of the server tests: the embedded tokenizer and one shared, real `pdserve serve`.

The server is a real subprocess (`python -m pdserve.cli serve`) on a free loopback port,
serving the embedded SmolLM2; tests talk to it with a real httpx client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server_helpers import MAX_NUM_SEQS

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, *flags: str) -> Server:
    """Start `pdserve serve` and wait until /health answers 200."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """One server for the whole folder: the embedded model, no --model flag. It schedules
    asynchronously, as a GPU instance does by default, so every server test covers that path
    (the engine tests compare it with serial steps token for token)."""
    srv = start_server(tmp_path_factory.mktemp("server"), "--max-num-seqs", str(MAX_NUM_SEQS),
                       "--async-scheduling")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="session")
def tokenizer():
    from pdserve.models.loader import load_tokenizer

    return load_tokenizer(None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that kill the shared server's engine run last."""
    items.sort(key=lambda item: item.get_closest_marker("kills_engine") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kills_engine: kills the shared server's engine; runs last")
