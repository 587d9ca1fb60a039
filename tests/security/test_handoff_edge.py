"""server/handoff.py at the function level: which kv_transfer_params an instance honours.

The HTTP-level tests (test_handoff.py) cannot make an internal call until the router signs
them; here `internal` is given directly, as the server reads it from request.state."""

from __future__ import annotations

import time

import pytest

from pdserve.config import EngineArgs
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.security import DeploymentSecret, SecretError, handoff_signed
from pdserve.server.errors import APIError
from pdserve.server.handoff import (
    check_kv_transfer_params,
    sign_prefill,
)

SECRET = DeploymentSecret.from_text("handoff-edge-test-secret-0123456789")
PROMPT = [1, 2, 3, 4, 5]
HELD = {"do_remote_prefill": True, "remote_request_id": "cmpl-1", "remote_block_ids": [7],
        "lease_token": "tok", "first_token_id": 9, "expires_at": 2**40}  # far away


def request(params: dict | None, prompt: list[int] = PROMPT) -> EngineRequest:
    return EngineRequest("r", prompt, SamplingParams(max_tokens=4), kv_transfer_params=params)


def decode_args(**kw) -> EngineArgs:
    return EngineArgs(role="decode", deployment_secret=SECRET, **kw)


def refused(params, args: EngineArgs, internal: bool, words: str, **kw) -> None:
    with pytest.raises(APIError) as e:
        check_kv_transfer_params(request(params, **kw), args, internal)
    assert e.value.status_code == 400 and words in e.value.message
    assert e.value.param == "kv_transfer_params"


def test_p_binds_its_params_to_the_prompt_and_signs_them():
    signed = sign_prefill(SECRET, HELD, PROMPT)
    assert handoff_signed(SECRET, signed) and signed["prompt_digest"]
    check_kv_transfer_params(request(signed), decode_args(), internal=False)  # honoured


@pytest.mark.parametrize("internal", [False, True])
def test_d_takes_only_its_own_prompts_signed_unexpired_hand_off(internal):
    signed = sign_prefill(SECRET, HELD, PROMPT)
    args = decode_args()
    refused(HELD, args, internal, "signed")  # unsigned, even from the router
    refused(signed | {"remote_block_ids": [8]}, args, internal, "signed")  # altered
    refused(sign_prefill(DeploymentSecret.from_text("x" * 20), HELD, PROMPT), args, internal,
            "signed")  # another deployment's
    refused(signed, args, internal, "another prompt", prompt=[1, 2, 3, 4, 6])
    refused(sign_prefill(SECRET, HELD | {"expires_at": int(time.time()) - 1}, PROMPT), args,
            internal, "expired")
    refused(sign_prefill(SECRET, HELD | {"expires_at": "soon"}, PROMPT), args, internal,
            "expired")
    refused(signed, EngineArgs(role="colocated"), internal, "signed")  # no secret here


def test_holding_kv_needs_an_internal_call_or_the_flag():
    hold = {"do_remote_decode": True}
    prefill = EngineArgs(role="prefill", deployment_secret=SECRET)
    refused(hold, prefill, False, "internal to a pdserve deployment")
    check_kv_transfer_params(request(hold), prefill, internal=True)
    flagged = EngineArgs(role="prefill", deployment_secret=SECRET, accept_client_kv_requests=True)
    check_kv_transfer_params(request(hold), flagged, internal=False)


@pytest.mark.parametrize("params", [{}, {"x": 1}, {"do_remote_decode": False}, "P1", [1]],
                         ids=repr)
def test_anything_else_from_a_client_is_refused(params):
    refused(params, decode_args(), False, "internal to a pdserve deployment")


def test_no_params_is_fine():
    check_kv_transfer_params(request(None), decode_args(), internal=False)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_p_and_d_need_the_secret(role):
    with pytest.raises(SecretError, match="PDSERVE_DEPLOYMENT_SECRET"):
        EngineArgs(role=role).require_deployment_secret()
    EngineArgs(role=role, deployment_secret=SECRET).require_deployment_secret()
    EngineArgs(role="colocated").require_deployment_secret()
