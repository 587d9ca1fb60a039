"""`pdserve up --decode-tp 3`: a TP=1 prefill instance feeds a TP=3 decode instance (the
embedded SmolLM2's 3 KV heads, one per decode rank), and the tokens are those of TP=1 alone."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.launch.test_up import READY, Up, descendants, start_up
from tests.router.cluster import blocks_in_use, internal, metric

PROMPTS = ["The three primary colours are", "A " * 30 + "story about a dragon who"]


@pytest.fixture(scope="module")
def up_tp(tmp_path_factory) -> Iterator[Up]:
    deployment = start_up(tmp_path_factory.mktemp("up-tp"), "--prefill", "1", "--decode", "1",
                          "--decode-tp", "3")
    proc = deployment.proc
    try:
        deployment.wait_for(READY, timeout_s=300)
        yield deployment
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
            proc.kill()
            proc.wait()


def completion(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=180)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_tp1_prefill_to_tp3_decode_gives_tp1_tokens(up_tp):
    instances = internal("GET", up_tp.url, "/instances").json()["instances"]
    by_role = {i["role"]: i["url"] for i in instances}
    for prompt in PROMPTS:
        # a plain request on P runs colocated at TP=1: the reference
        reference = completion(by_role["prefill"], prompt)
        assert completion(up_tp.url, prompt) == reference  # P (TP=1) -> D (TP=3)
    decode = by_role["decode"]
    assert metric(decode, "pdserve:kv_pulls_ok_total") == len(PROMPTS)
    assert metric(decode, "pdserve:kv_pulls_failed_total") == 0
    assert metric(up_tp.url, "pdserve_router:requests_total", kind="disagg") == len(PROMPTS)
    deadline = time.monotonic() + 45
    while any(blocks_in_use(u) for u in by_role.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(blocks_in_use(u) for u in by_role.values())  # P's leases ended, D freed
