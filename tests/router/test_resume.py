"""A decode instance killed mid-answer loses no request: the router resumes the answer on
another instance, and the client gets the uninterrupted greedy text, usage and [DONE].

Its own instances (one prefill, two decode), so that killing one disturbs no other test;
each test revives what the previous one killed, on the same port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pdserve.security import DeploymentSecret, sign_request
from tests.router.cluster import (
    GREEDY,
    REPO,
    Proc,
    env,
    free_port,
    internal,
    metric,
    start_router,
    stream_text,
    wait_healthy,
)

MAX_TOKENS = 64
KILL_AFTER_CHUNKS = 4
FLAGS = ("--max-num-seqs", "8", "--kv-cache-memory", "64MiB")
PROMPT = "Write a short story about a lighthouse keeper and a storm."
CHAT = [{"role": "user", "content": "Tell me about the history of the bicycle."}]


@dataclass
class Pool:
    """One prefill and two decode instances on fixed ports; `revive` restarts the dead."""

    tmp: Path
    roles: dict[str, str] = field(default_factory=dict)  # url -> role
    procs: dict[str, Proc] = field(default_factory=dict)  # url -> its process

    def start(self, role: str, port: int | None = None) -> Proc:
        port = port or free_port()
        log_path = self.tmp / f"{role}-{port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--role", role, *FLAGS,
               "--port", str(port)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        p = Proc(f"http://127.0.0.1:{port}", proc, log_path)
        self.roles[p.url], self.procs[p.url] = role, p
        return p

    def revive(self) -> None:
        dead = [url for url, p in self.procs.items() if p.proc.poll() is not None]
        for url in dead:
            self.start(self.roles[url], int(url.rsplit(":", 1)[1]))
        wait_healthy(*self.procs.values())
        if dead:
            time.sleep(2.5)  # the routers' health checks see them again

    def of(self, role: str) -> list[Proc]:
        return [p for url, p in self.procs.items() if self.roles[url] == role]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("resume"))
    for role in ("prefill", "decode", "decode"):
        pool.start(role)
    try:
        wait_healthy(*pool.procs.values())
        yield pool
    finally:
        for p in pool.procs.values():
            p.terminate()
        for p in pool.procs.values():
            p.stop()


@pytest.fixture(scope="module")
def disagg_router(pool) -> Iterator[Proc]:
    r = start_router(pool.tmp, prefill=pool.of("prefill"), decode=pool.of("decode"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def decode_router(pool) -> Iterator[Proc]:
    """No prefill instance: each request is served whole on a decode instance (plain)."""
    r = start_router(pool.tmp, decode=pool.of("decode"))
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def revived(pool) -> None:
    pool.revive()


def request_body(chat: bool, stream: bool) -> dict:
    body = {"max_tokens": MAX_TOKENS, "stream": stream, **GREEDY}
    body.update({"messages": CHAT} if chat else {"prompt": PROMPT})
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def path_of(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def serving_decode(router: Proc, pool: Pool) -> Proc | None:
    """The decode instance the router has a request on, if any."""
    listed = internal("GET", router.url, "/instances").json()["instances"]
    busy = {i["url"] for i in listed if i["in_flight"] > 0 and i["role"] == "decode"}
    return next((p for p in pool.of("decode") if p.url in busy), None)


def stream(router: Proc, body: dict, chat: bool, kill: Pool | None = None
           ) -> tuple[list[dict | str], Proc | None]:
    """The stream's events; with `kill`, the decode instance serving it is killed -9 after
    KILL_AFTER_CHUNKS content chunks."""
    events: list[dict | str] = []
    victim = None
    with httpx.stream("POST", router.url + path_of(chat), json=body, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            content = [e for e in events if isinstance(e, dict) and e.get("choices")]
            if kill is not None and victim is None and len(content) >= KILL_AFTER_CHUNKS:
                victim = serving_decode(router, kill)
                assert victim is not None, "no decode instance serves the stream"
                victim.kill()
    return events, victim


def assert_whole_stream(events: list[dict | str], chat: bool, reference: str) -> None:
    """What a client of an undisturbed run gets: the text, one id, one role chunk, the
    finish reason, usage counting every token, [DONE], and nothing internal."""
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert not [c for c in chunks if "error" in c], chunks
    assert stream_text(events, chat) == reference
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == MAX_TOKENS
    if chat:
        roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1
    for c in chunks:
        assert "kv_transfer_params" not in c
        assert all("token_ids" not in choice for choice in c["choices"])


def resumed(router: Proc, outcome: str = "resumed") -> float:
    return metric(router.url, "pdserve_router:resumes_total", outcome=outcome)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_killed_decode_mid_stream_the_client_gets_the_uninterrupted_text(
        pool, disagg_router, chat):
    reference, _ = stream(disagg_router, request_body(chat, True), chat)
    assert_whole_stream(reference, chat, stream_text(reference, chat))
    before = resumed(disagg_router)
    events, victim = stream(disagg_router, request_body(chat, True), chat, kill=pool)
    assert victim is not None and victim.proc.poll() is not None
    assert_whole_stream(events, chat, stream_text(reference, chat))
    assert resumed(disagg_router) == before + 1


def test_killed_decode_of_a_plain_stream_resumes_on_the_other(pool, decode_router):
    reference, _ = stream(decode_router, request_body(False, True), False)
    events, victim = stream(decode_router, request_body(False, True), False, kill=pool)
    assert victim is not None
    assert_whole_stream(events, False, stream_text(reference, False))
    assert resumed(decode_router) == 1


def test_killed_decode_of_a_non_streamed_request_runs_it_again(pool, disagg_router):
    body = request_body(False, False)
    url = disagg_router.url + "/v1/completions"
    reference = httpx.post(url, json=body, timeout=300).json()
    before = resumed(disagg_router, "rerun")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        resp=httpx.post(url, json=body, timeout=300)))
    thread.start()
    deadline = time.monotonic() + 120
    while (victim := serving_decode(disagg_router, pool)) is None:
        assert time.monotonic() < deadline and thread.is_alive(), "never reached D"
        time.sleep(0.02)
    time.sleep(1.0)  # into its decoding
    victim.kill()
    thread.join(300)
    resp = result["resp"]
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["choices"][0]["text"] == reference["choices"][0]["text"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS
    assert "kv_transfer_params" not in answer
    assert resumed(disagg_router, "rerun") == before + 1


def resume_request(token_ids: list[int], text_chars: int) -> dict:
    return {**request_body(False, True), "resume": {"token_ids": token_ids,
                                                    "text_chars": text_chars}}


def chunks_of(url: str) -> list[tuple[list[int], str]]:
    """An undisturbed stream's chunks as (token ids, text), read straight from an instance."""
    body = {**request_body(False, True), "return_token_ids": True}
    out = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: "):])["choices"]:  # [] with usage
                    out.append((choice["token_ids"], choice["text"]))
    return out


def test_an_instance_continues_a_signed_resume_exactly(pool):
    d = pool.of("decode")[0]
    chunks = chunks_of(d.url)
    assert sum(len(ids) for ids, _ in chunks) == MAX_TOKENS
    ids = [t for chunk_ids, _ in chunks[:10] for t in chunk_ids]
    head = "".join(text for _, text in chunks[:10])  # what a client of it has
    content = json.dumps(resume_request(ids, len(head))).encode()
    headers = {"content-type": "application/json",
               **sign_request(DeploymentSecret.from_env(), "POST",
                              "/v1/completions", content)}
    with httpx.stream("POST", d.url + "/v1/completions", content=content, headers=headers,
                      timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        events = [line[len("data: "):] for line in resp.iter_lines()
                  if line.startswith("data: ")]
    rest = "".join(json.loads(data)["choices"][0]["text"] for data in events[:-2])
    assert head + rest == "".join(text for _, text in chunks)
    assert json.loads(events[-2])["usage"]["completion_tokens"] == MAX_TOKENS
    # the same signed call again is a replay: refused
    again = httpx.post(d.url + "/v1/completions", content=content, headers=headers, timeout=60)
    assert again.status_code == 400


@pytest.mark.parametrize("auth", ["none", "wrong_secret", "other_body"])
def test_a_client_cannot_send_resume_to_an_instance(pool, auth):
    d = pool.of("decode")[0]
    body = resume_request([1, 2, 3], 5)
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if auth == "wrong_secret":
        headers.update(sign_request(DeploymentSecret.from_text("x" * 32), "POST",
                                    "/v1/completions", content))
    elif auth == "other_body":
        headers.update(sign_request(DeploymentSecret.from_env(), "POST",
                                    "/v1/completions", b"{}"))
    resp = httpx.post(d.url + "/v1/completions", content=content, headers=headers, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "resume"


def test_a_client_cannot_send_resume_through_the_router(disagg_router):
    resp = httpx.post(disagg_router.url + "/v1/completions", timeout=60,
                      json=resume_request([1, 2, 3], 5))
    assert resp.status_code == 400, resp.text
    assert "resume" in resp.json()["error"]["message"]
