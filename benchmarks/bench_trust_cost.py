"""What the trust model costs (issue 12): each security step timed alone, and against a
whole 1P1D request.

  (a) the mutual challenge on a new KV connection (D keeps its connections to P open
      across pulls, so a request pays it only when a connection is new);
  (b) signing a hand-off on P (prompt digest + MAC) and checking it on D, for a 1k-token
      prompt: 64 block ids of 16 tokens;
  (c) an internal HTTP call's MAC: signing on the router, checking on an instance (with
      replay memory), for a 1k-token request body;
  (d) with --e2e: a 1P1D request's end-to-end time through a real router, P and D on this
      machine (embedded SmolLM2), and each cost above as a fraction of it.

    python benchmarks/bench_trust_cost.py [--e2e] [--out benchmarks/results/trust_cost_cpu.json]

Prints one JSON object (also written to --out), times in microseconds (medians).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from pdserve.security import (
    SECRET_ENV,
    DeploymentSecret,
    RequestVerifier,
    prompt_digest,
    sign_request,
)
from pdserve.server.handoff import check_handoff, sign_prefill
from pdserve.transfer.host import allocate_shared_kv_caches, unlink_shared_kv_caches
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.source import KVSource
from pdserve.transfer.wire import Connection

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 1024
BLOCK_SIZE = 16


def median_us(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `fn()` in microseconds (after a few warm-up calls)."""
    for _ in range(min(10, reps)):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 2)


def handshake_cost(secret: DeploymentSecret, reps: int) -> dict:
    """A new KV connection with its challenge, against a bare TCP connect to the same source."""
    layout = KVLayout("float32", BLOCK_SIZE, 2, 2, 8)
    name = f"trust-bench-{uuid.uuid4().hex[:6]}"
    caches = allocate_shared_kv_caches(layout, 4, name)
    source = KVSource(caches, layout, LeaseTable(), shm_name=name, secret=secret).start()
    endpoint = source.endpoint()
    try:
        def bare() -> None:
            socket.create_connection((endpoint["host"], endpoint["port"]), 5).close()

        def challenged() -> None:
            Connection(endpoint, 5.0, secret=secret).close()

        bare_us, new_us = median_us(bare, reps), median_us(challenged, reps)
    finally:
        source.close()
        unlink_shared_kv_caches(name)
    return {"tcp_connect_us": bare_us, "connect_with_handshake_us": new_us,
            "handshake_us": round(new_us - bare_us, 2)}


def handoff_cost(secret: DeploymentSecret, reps: int) -> dict:
    """P's signing and D's check of the kv_transfer_params of a 1k-token prompt."""
    prompt = list(range(1000, 1000 + PROMPT_TOKENS))
    blocks = list(range(3, 3 + PROMPT_TOKENS // BLOCK_SIZE))
    endpoint = {"host": "127.0.0.1", "port": 41234, "host_id": "host/boot", "device": "cpu",
                "transports": ["host", "tcp"], "tp_rank": 0, "gpu_uuid": None}
    engine_params = {  # what KVConnector.hold returns
        "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "0123456789ab",
        "remote_host": "127.0.0.1", "remote_port": 41234, "remote_block_ids": blocks,
        "remote_request_id": f"cmpl-{uuid.uuid4().hex}", "tp_size": 1,
        "kv_layout": KVLayout("bfloat16", BLOCK_SIZE, 32, 8, 128).to_dict(),
        "kv_endpoints": [endpoint], "lease_token": "x" * 24, "first_token_id": 42,
        "expires_at": int(time.time()) + 3600,
    }
    signed = sign_prefill(secret, engine_params, prompt)
    return {
        "prompt_tokens": PROMPT_TOKENS, "block_ids": len(blocks),
        "params_json_bytes": len(json.dumps(signed)),
        "prompt_digest_us": median_us(lambda: prompt_digest(prompt), reps),
        "sign_on_p_us": median_us(lambda: sign_prefill(secret, engine_params, prompt), reps),
        "verify_on_d_us": median_us(lambda: check_handoff(signed, prompt, secret), reps),
    }


def internal_call_cost(secret: DeploymentSecret, reps: int) -> dict:
    """The MAC of one internal call carrying a 1k-token prompt (~5 KB of JSON)."""
    body = json.dumps({"prompt": "word " * PROMPT_TOKENS, "max_tokens": 16,
                       "kv_transfer_params": {"do_remote_decode": True}}).encode()
    verifier = RequestVerifier(secret)
    path = "/v1/completions"

    def sign() -> None:
        sign_request(secret, "POST", path, body)

    def verify() -> None:  # each check needs a fresh header: nonces are single-use
        header = sign_request(secret, "POST", path, body)["X-PDServe-Auth"]
        assert verifier.verify(header, "POST", path, body)

    sign_us = median_us(sign, reps)
    return {"body_bytes": len(body), "sign_us": sign_us,
            "verify_us": round(median_us(verify, reps) - sign_us, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def e2e_cost(secret: DeploymentSecret, requests: int) -> dict:
    """Median end-to-end time of a 1k-token, 16-output-token greedy request through a router,
    a prefill and a decode instance (each on its own process, this machine)."""
    env = {**os.environ, SECRET_ENV: secret.to_text(), "PYTHONPATH": str(REPO),
           "PDSERVE_CPU_THREADS": "1", "OMP_NUM_THREADS": "1"}
    logs = Path(tempfile.mkdtemp(prefix="trust-bench-"))
    procs, urls = [], {}

    def spawn(name: str, *args: str) -> None:
        port = free_port()
        urls[name] = f"http://127.0.0.1:{port}"
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pdserve.cli", *args, "--port", str(port)], cwd=REPO,
                env=env, stdout=log, stderr=subprocess.STDOUT))

    import httpx

    try:
        flags = ("--max-num-seqs", "8", "--kv-cache-memory", "256MiB")
        # P holds KV for any caller: the router's calls to P count as internal only where
        # the router signs them (trust-http); the flag keeps the bench valid either way
        spawn("p", "serve", "--role", "prefill", "--accept-client-kv-requests", *flags)
        spawn("d", "serve", "--role", "decode", *flags)
        _wait(urls["p"], procs[0])
        _wait(urls["d"], procs[1])
        spawn("router", "router", "--prefill", urls["p"], "--decode", urls["d"])
        _wait(urls["router"], procs[2])
        times = []
        for i in range(requests + 1):  # the first warms both instances up
            body = {"prompt": f"{i} " + "word " * (PROMPT_TOKENS - 2), "max_tokens": 16,
                    "temperature": 0.0, "ignore_eos": True}
            start = time.perf_counter()
            resp = httpx.post(urls["router"] + "/v1/completions", json=body, timeout=600)
            elapsed = time.perf_counter() - start
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["prompt_tokens"] >= PROMPT_TOKENS - 2
            if i:
                times.append(elapsed)
        pulled = _metric(urls["d"], "pdserve:kv_pulls_ok_total")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    return {"requests": requests, "prompt_tokens": PROMPT_TOKENS, "max_tokens": 16,
            "kv_pulls_ok": pulled, "e2e_median_us": round(statistics.median(times) * 1e6, 1)}


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 1200) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy")


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000, help="timed calls per figure")
    parser.add_argument("--handshake-reps", type=int, default=300)
    parser.add_argument("--e2e", action="store_true", help="also time 1P1D requests")
    parser.add_argument("--e2e-requests", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    secret = DeploymentSecret.generate()
    result = {
        "bench": "trust_cost",
        "command": " ".join(["python", "benchmarks/bench_trust_cost.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores, shared with other jobs)",
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],  # shared machine
        "kv_handshake": handshake_cost(secret, args.handshake_reps),
        "handoff": handoff_cost(secret, args.reps),
        "internal_call": internal_call_cost(secret, args.reps),
    }
    if args.e2e:
        e2e = e2e_cost(secret, args.e2e_requests)
        per_request = (result["handoff"]["sign_on_p_us"] + result["handoff"]["verify_on_d_us"]
                       + 2 * (result["internal_call"]["sign_us"]
                              + result["internal_call"]["verify_us"]))
        e2e["per_request_security_us"] = round(per_request, 2)  # hand-off + router's 2 calls
        e2e["ratio_per_request"] = round(per_request / e2e["e2e_median_us"], 6)
        e2e["ratio_new_kv_connection"] = round(
            result["kv_handshake"]["handshake_us"] / e2e["e2e_median_us"], 6)
        e2e["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
        result["e2e_1p1d"] = e2e
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
