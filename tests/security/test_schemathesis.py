"""The hostile client, kept: schemathesis fuzzes an instance's and a router's OpenAPI schemas.

Real processes on loopback: a colocated instance fuzzed directly, and a router in front of a
prefill/decode pair of the same deployment (one secret), all serving the embedded SmolLM2 on
CPU. Generated requests may ask for long generations: `--max-model-len` bounds them, so no
input is filtered out. Every answer must be a non-5xx; 4xx answers must be OpenAI error
bodies; a 200 stream must end in `[DONE]` with no error event; nothing internal (hand-off
params, instance URLs) may reach a client. Afterwards every instance is healthy, gives the
greedy answer it gave before the fuzzing, and has its KV pool back to all-free.

`PDSERVE_FUZZ_EXAMPLES` sets the examples per operation (default below: ~1.5 min on 2 CPU
cores, CI's 25-minute budget; 40 took ~2.5 min); the run is derandomized, so CI and a local
run send the same requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.router.cluster import (
    Proc,
    start_instance,
    start_router,
    wait_all_free,
    wait_healthy,
)

schemathesis = pytest.importorskip("schemathesis", minversion="4")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from pdserve.security import API_KEY_ENV, SECRET_ENV  # noqa: E402

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "25"))
# 48 tokens of context: a chat prompt is 30 of them, so no request generates more than ~18.
INSTANCE_FLAGS = ("--max-model-len", "48", "--max-num-seqs", "4", "--kv-cache-memory",
                  "64MiB", "--kv-lease-ttl-s", "10", "--open-metrics")
REQUEST_TIMEOUT_S = 60.0  # a live answer is bounded by max-model-len; longer means hung
PROBE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0,
         "ignore_eos": True}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a live server on shared cores: latency is not the property under test
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each failure is a live request
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Deployment:
    instance: Proc  # colocated, fuzzed directly
    router: Proc  # in front of prefill + decode
    prefill: Proc
    decode: Proc
    before: dict[str, str]  # url -> greedy PROBE text before the fuzzing

    def instances(self) -> list[Proc]:
        return [self.instance, self.prefill, self.decode]


def probe_text(url: str) -> str:
    resp = httpx.post(url + "/v1/completions", json=PROBE, timeout=REQUEST_TIMEOUT_S)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        # One deployment secret for the router and the pair; no API key (clients send none).
        mp.setenv(SECRET_ENV, os.urandom(24).hex())
        mp.delenv(API_KEY_ENV, raising=False)
        procs = [start_instance(tmp, role, *INSTANCE_FLAGS)
                 for role in ("colocated", "prefill", "decode")]
        router = None
        try:
            wait_healthy(*procs)
            instance, prefill, decode = procs
            router = start_router(tmp, prefill=[prefill], decode=[decode])
            wait_healthy(router)
            before = {p.url: probe_text(p.url) for p in (instance, router)}
            yield Deployment(instance, router, prefill, decode, before)
        finally:
            for p in [router, *procs]:
                if p is not None:
                    p.terminate()
            for p in [router, *procs]:
                if p is not None:
                    p.stop()


def load_schema(url: str):
    """The app's own /openapi.json; its OpenAI routes must declare their bodies (else
    schemathesis would send none and fuzz nothing)."""
    doc = httpx.get(url + "/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert "requestBody" in doc["paths"][path]["post"], f"{url}{path} declares no body"
    # Unsanitized: "max_tokens" looks like a secret to schemathesis, and a repro needs it.
    config = SchemathesisConfig.from_dict({"output": {"sanitization": {"enabled": False}}})
    return schemathesis.openapi.from_url(url + "/openapi.json", config=config, timeout=30)


@pytest.fixture(scope="module")
def instance_schema(deployment):
    return load_schema(deployment.instance.url)


@pytest.fixture(scope="module")
def router_schema(deployment):
    return load_schema(deployment.router.url)


def internal_urls(dep: Deployment) -> list[str]:
    return [p.url.removeprefix("http://") for p in dep.instances()]


CLIENT_PATHS = ("/v1/", "/tokenize", "/detokenize")  # the routes whose errors are OpenAI's


def check_answer(path: str, routed: bool, status: int, ctype: str, text: str,
                 internal: list[str]) -> None:
    """What every answer to a client must be, beyond schemathesis's own checks. `routed`:
    the request reached the route (its documented method), not FastAPI's 404/405."""
    if not path.startswith(CLIENT_PATHS):  # (/metrics, /instances: operators' routes)
        return
    leaked = [u for u in internal if u in text]
    assert not leaked, f"answer names internal instances {leaked}"
    if 400 <= status < 500 and routed:
        err = json.loads(text).get("error")
        assert isinstance(err, dict), "a 4xx that is not an OpenAI error body"
        assert set(err) >= {"message", "type", "param", "code"}, "error body lacks fields"
        assert isinstance(err["message"], str) and err["message"], "error without a message"
    elif status == 200 and ctype.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", "a 200 stream that does not end in [DONE]"
        for e in events[:-1]:
            chunk = json.loads(e)
            assert "error" not in chunk, "a 200 stream that carries an error event"
            assert chunk.get("kv_transfer_params") is None, "hand-off params reach a client"
    elif status == 200 and "choices" in text:
        assert json.loads(text).get("kv_transfer_params") is None, \
            "hand-off params reach a client"


def fuzz_one(case, dep: Deployment) -> None:
    response = case.call_and_validate(
        checks=[not_a_server_error, response_schema_conformance], timeout=REQUEST_TIMEOUT_S)
    headers = {k.lower(): v for k, v in response.headers.items()}  # name -> list of values
    ctype = (headers.get("content-type") or [""])[0]
    try:
        routed = case.method.upper() == case.operation.method.upper()
        check_answer(case.operation.path, routed, response.status_code, ctype, response.text,
                     internal_urls(dep))
    except (AssertionError, ValueError) as exc:
        raise AssertionError(f"{exc}\n[{response.status_code}] {response.text[:800]}\n"
                             f"Reproduce with:\n    {case.as_curl_command()}") from None


instance_fuzz = schemathesis.pytest.from_fixture("instance_schema")
router_fuzz = schemathesis.pytest.from_fixture("router_schema")


@instance_fuzz.parametrize()
@FUZZ_SETTINGS
def test_instance_answers_any_request_without_5xx(case, deployment):
    fuzz_one(case, deployment)


@router_fuzz.parametrize()
@FUZZ_SETTINGS
def test_router_answers_any_request_without_5xx(case, deployment):
    fuzz_one(case, deployment)


def test_instances_healthy_and_correct_after_fuzzing(deployment):
    """Runs after the fuzzing (file order): nothing a client sent broke or poisoned anything."""
    for p in [*deployment.instances(), deployment.router]:
        assert p.proc.poll() is None, f"{p.url} exited:\n{p.log()}"
        resp = httpx.get(p.url + "/health", timeout=10)
        assert resp.status_code == 200, f"{p.url}: {resp.text}\n{p.log()}"
    for url, text in deployment.before.items():
        assert probe_text(url) == text, f"{url} answers the probe differently after fuzzing"
    assert not any(wait_all_free(*deployment.instances()).values()), "KV blocks leaked"
