"""Findings 1, 2 and 3 of issue 12 with real processes: a router, a prefill instance P and a
decode instance D, all holding the test deployment secret (tests/conftest.py).

P runs with --accept-client-kv-requests so that the tests can ask it to hold KV directly,
as a client (the router's own calls are internal ones): that is how a hostile client got
P's kv_transfer_params before the router stopped passing them on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from pdserve.security import DeploymentSecret, handoff_signed, sign_handoff
from pdserve.transfer.wire import recv_msg, send_msg
from tests.router.cluster import (
    GREEDY,
    REPO,
    Proc,
    env,
    internal,
    metric,
    start_instance,
    start_router,
    wait_healthy,
)

SECRET = DeploymentSecret.from_env()
FLAGS = ("--max-num-seqs", "16", "--kv-cache-memory", "128MiB")
# A is at least as long as B: D once took A's blocks for B's whole prompt (finding 3)
PROMPT_A = ("The history of the Roman Empire spans many centuries, from the founding of the "
            "city to the fall of Constantinople. Its emperors, legions and roads shaped "
            "Europe. Tell me about its first emperor:")
PROMPT_B = ("A recipe for a simple tomato soup needs ripe tomatoes, an onion, garlic, olive "
            "oil, salt and a little sugar. Describe the first step of cooking it:")
PROMPT_C = "Write one sentence about the sea and the wind, then stop:"
MAX_TOKENS = 8
FINDING_1 = [
    {"kv_layout": {"dtype": "float32", "block_size": 16, "num_layers": 30,
                   "num_kv_heads": 0, "head_dim": 64}},
    {"remote_block_ids": "[1e400]"},  # sent as the raw JSON number below
]


@dataclass
class Cluster:
    router: Proc
    p: Proc
    d: Proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("handoff")
    p = start_instance(tmp, "prefill", "--accept-client-kv-requests", *FLAGS)
    d = start_instance(tmp, "decode", *FLAGS)
    try:
        wait_healthy(p, d)
        router = start_router(tmp, prefill=[p], decode=[d])
        try:
            yield Cluster(router, p, d)
        finally:
            router.stop()
    finally:
        p.stop()
        d.stop()


def post(url: str, prompt: str, max_tokens: int = MAX_TOKENS, raw: str | None = None,
         **fields) -> httpx.Response:
    """A greedy completion; `raw`: the body as sent (numbers Python's JSON cannot write)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, **GREEDY, **fields}
    if raw is not None:
        return httpx.post(url + "/v1/completions", content=raw, timeout=300,
                          headers={"content-type": "application/json"})
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def held_params(cluster: Cluster, prompt: str) -> dict:
    """What P hands out for `prompt` (it then holds its KV under a lease)."""
    resp = post(cluster.p.url, prompt, max_tokens=1,
                kv_transfer_params={"do_remote_decode": True})
    assert resp.status_code == 200, resp.text
    return resp.json()["kv_transfer_params"]


def decode_with(cluster: Cluster, prompt: str, params: dict) -> httpx.Response:
    return post(cluster.d.url, prompt, kv_transfer_params=params)


def refused(resp: httpx.Response, words: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert words in error["message"] and error["param"] == "kv_transfer_params", error


def healthy(proc: Proc) -> None:
    assert httpx.get(proc.url + "/health", timeout=10).status_code == 200
    assert text(post(proc.url, "Hello", max_tokens=2))


def resigned(params: dict, **changes) -> dict:
    """`params` changed and signed again with the secret: a hand-off only a holder of the
    secret could make (a test here plays that part)."""
    body = {k: v for k, v in params.items() if k != "pdserve_sig"} | changes
    return sign_handoff(SECRET, body)


def test_p_signs_its_hand_off_and_the_router_path_pulls_it(cluster):
    ktp = held_params(cluster, PROMPT_C)
    assert handoff_signed(SECRET, ktp)
    assert {"prompt_digest", "expires_at", "lease_token", "pdserve_sig"} <= set(ktp)
    assert ktp["expires_at"] > time.time() + 10
    release = {"remote_request_id": ktp["remote_request_id"], "lease_token": ktp["lease_token"]}
    assert internal("POST", cluster.p.url, "/v1/kv/release", release).status_code == 200
    pulls = metric(cluster.d.url, "pdserve:kv_pulls_ok_total")
    via_router = text(post(cluster.router.url, PROMPT_C))
    # D honoured P's signature, after the router carried it
    assert metric(cluster.d.url, "pdserve:kv_pulls_ok_total") == pulls + 1
    assert via_router == text(post(cluster.p.url, PROMPT_C))  # the colocated computation


def test_finding_3_a_hand_off_cannot_move_kv_to_another_prompt(cluster):
    a_params = held_params(cluster, PROMPT_A)
    refused(decode_with(cluster, PROMPT_B, a_params), "another prompt")
    # B, from anyone, afterwards: D's own prefill, as P computes it from scratch
    assert text(post(cluster.d.url, PROMPT_B)) == text(post(cluster.p.url, PROMPT_B))
    assert text(decode_with(cluster, PROMPT_A, a_params))  # its own prompt: honoured


def test_finding_3_an_expired_hand_off_is_refused(cluster):
    params = resigned(held_params(cluster, PROMPT_C), expires_at=int(time.time()) - 1)
    refused(decode_with(cluster, PROMPT_C, params), "expired")


def listening_socket() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def never_dialed(sock: socket.socket) -> bool:
    try:
        sock.accept()
    except BlockingIOError:
        return True
    return False


def test_finding_2_instances_dial_no_endpoint_a_client_names(cluster):
    with listening_socket() as trap:
        port = trap.getsockname()[1]
        endpoint = {"host": "127.0.0.1", "port": port, "transports": ["tcp"]}
        client_made = {"do_remote_prefill": True, "remote_engine_id": "x",
                       "remote_request_id": "cmpl-1", "remote_block_ids": [0, 1, 2, 3, 4],
                       "kv_layout": {"dtype": "float32", "block_size": 16, "num_layers": 30,
                                     "num_kv_heads": 3, "head_dim": 64},
                       "kv_endpoints": [endpoint], "first_token_id": 11, "lease_token": "t"}
        tampered = held_params(cluster, PROMPT_C) | {"kv_endpoints": [endpoint]}
        for params in (client_made, tampered):
            for proc in (cluster.d, cluster.p):
                refused(post(proc.url, PROMPT_C, kv_transfer_params=params), "signed")
        time.sleep(1.0)
        assert never_dialed(trap)


def impostor_source(seen: list) -> socket.socket:
    """A KV source without the secret: it can send a challenge, never answer D's."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(20)
            send_msg(conn, {"challenge": "0123456789abcdef"})
            seen.append(recv_msg(conn))
            send_msg(conn, {"answer": "f" * 64})
            try:
                seen.append(recv_msg(conn))  # D's next frame, if D went on (None: it hung up)
            except OSError as e:
                seen.append(repr(e))

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_finding_2_d_refuses_a_kv_source_without_the_secret(cluster):
    seen: list = []
    with impostor_source(seen) as server:
        endpoint = {"host": "127.0.0.1", "port": server.getsockname()[1], "transports": ["tcp"],
                    "host_id": "elsewhere"}
        params = resigned(held_params(cluster, PROMPT_B), kv_endpoints=[endpoint])
        failed = metric(cluster.d.url, "pdserve:kv_pulls_failed_total")
        answer = text(decode_with(cluster, PROMPT_B, params))  # D prefilled locally instead
        assert metric(cluster.d.url, "pdserve:kv_pulls_failed_total") == failed + 1
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "answer" in seen[0] and seen[1] is None  # no read nor release frame followed
    # D's answer is the whole completion, P's first token first: the colocated text
    assert answer == text(post(cluster.p.url, PROMPT_B))


@pytest.mark.parametrize("payload", FINDING_1, ids=["num_kv_heads_0", "block_id_1e400"])
def test_finding_1_malformed_params_get_400_and_the_instances_live_on(cluster, payload):
    base = held_params(cluster, PROMPT_C)
    for signed in (False, True):  # at the edge; and past it, in the engine's parser
        params = base | payload
        params = resigned(params) if signed else params
        raw = json.dumps({"prompt": PROMPT_C, "max_tokens": MAX_TOKENS, **GREEDY,
                          "kv_transfer_params": params})
        raw = raw.replace('"[1e400]"', "[1e400]")
        for proc in (cluster.d, cluster.p):
            resp = post(proc.url, PROMPT_C, raw=raw)
            assert resp.status_code == 400, resp.text
    for proc in (cluster.d, cluster.p):
        healthy(proc)


def test_a_client_cannot_ask_d_to_hold_kv_nor_send_other_params(cluster):
    refused(decode_with(cluster, PROMPT_C, {"do_remote_decode": True}), "internal")
    refused(decode_with(cluster, PROMPT_C, {"remote_block_ids": [1]}), "do_remote_prefill")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_prefill_and_decode_refuse_to_start_without_a_secret(tmp_path, role):
    no_secret = {k: v for k, v in env().items() if k != "PDSERVE_DEPLOYMENT_SECRET"}
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--role", role,
                           "--port", "1"], cwd=REPO, env=no_secret, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "PDSERVE_DEPLOYMENT_SECRET" in proc.stderr and "--secret-file" in proc.stderr
    assert os.environ.get("PDSERVE_DEPLOYMENT_SECRET")  # the others still have theirs
