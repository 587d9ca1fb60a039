"""The router's tool endpoints: /tokenize and /detokenize answered by an instance, /version,
/ping and /v1/models/{model_id} by the router itself; bad input refused at the router."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

import pdserve
from pdserve.models.loader import load_tokenizer
from tests.router.cluster import Proc, start_instance, start_router, wait_healthy
from tests.router.conftest import INSTANCE_FLAGS

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("tools")
    inst = start_instance(tmp, "colocated", *INSTANCE_FLAGS)
    r = None
    try:
        wait_healthy(inst)
        r = start_router(tmp, colocated=[inst])
        yield r
    finally:
        for p in (r, inst):
            if p is not None:
                p.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def post(router: Proc, path: str, body: dict) -> httpx.Response:
    return httpx.post(router.url + path, json=body, timeout=60)


def test_tokenize_through_the_router(router, tokenizer):
    text = "Disaggregated serving splits prefill and decode."
    body = post(router, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer(text).input_ids
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = post(router, "/tokenize", {"messages": MESSAGES}).json()
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                             add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False).input_ids


def test_detokenize_through_the_router(router, tokenizer):
    ids = tokenizer("Hello from the router", add_special_tokens=False).input_ids
    assert post(router, "/detokenize", {"tokens": ids}).json() == {
        "prompt": "Hello from the router"}


@pytest.mark.parametrize("path,body,status", [
    ("/tokenize", {}, 400),  # refused by the router's own validation
    ("/tokenize", {"prompt": ["a"]}, 400),
    ("/detokenize", {"tokens": [-5]}, 400),
    ("/detokenize", {"tokens": [10**8]}, 400),  # out of vocabulary: the instance says so
    ("/tokenize", {"prompt": "x", "model": "no-such-model"}, 404),
])
def test_bad_input_is_refused_in_openai_form(router, path, body, status):
    resp = post(router, path, body)
    assert resp.status_code == status, resp.text
    assert set(resp.json()["error"]) >= {"message", "type", "param", "code"}


def test_router_answers_version_ping_and_model_by_id(router):
    assert httpx.get(router.url + "/version").json() == {"version": pdserve.__version__}
    assert httpx.get(router.url + "/ping").status_code == 200
    assert httpx.post(router.url + "/ping").status_code == 200
    model_id = httpx.get(router.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    card = httpx.get(f"{router.url}/v1/models/{model_id}", timeout=10).json()
    assert card["id"] == model_id and card["object"] == "model"
    missing = httpx.get(router.url + "/v1/models/org/none", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/models/a%0Ab", "/no/such/route"])
def test_a_path_no_route_matches_gets_an_openai_404(router, path):
    """Found by schemathesis: a model id with a newline matched no route, and the router
    answered FastAPI's own {"detail": ...} instead of an OpenAI error body."""
    resp = httpx.get(router.url + path, timeout=30)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"
