"""server/handoff.py at the function level: which kv_transfer_params an instance honours.

The HTTP-level tests (test_handoff.py) cannot make an internal call until the router signs
them; here `internal` is given directly, as the server reads it from request.state."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pdserve.config import EngineArgs
from pdserve.engine.handoff import HeldPrefill, HoldForDecode, RemotePrefill
from pdserve.engine.outputs import TokenLogprob
from pdserve.security import DeploymentSecret, SecretError, handoff_signed
from pdserve.server.errors import APIError
from pdserve.server.handoff import accept_handoff, sign_prefill
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.params import RemoteKV

SECRET = DeploymentSecret.from_text("handoff-edge-test-secret-0123456789")
PROMPT = [1, 2, 3, 4, 5]
VOCAB = 100
ENDPOINT = {"host": "127.0.0.1", "port": 9, "transports": ["tcp"]}
HELD = HeldPrefill(RemoteKV("engine-1", "cmpl-1", [7], KVLayout("float32", 16, 2, 2, 8),
                            [ENDPOINT], "tok"), first_token_id=9, expires_at=2**40)  # far away


def accept(params, args: EngineArgs, internal: bool, prompt: list[int] = PROMPT):
    return accept_handoff(params, prompt, args, internal, VOCAB)


def decode_args(**kw) -> EngineArgs:
    return EngineArgs(role="decode", deployment_secret=SECRET, **kw)


def refused(params, args: EngineArgs, internal: bool, words: str, **kw) -> None:
    with pytest.raises(APIError) as e:
        accept(params, args, internal, **kw)
    assert e.value.status_code == 400 and words in e.value.message
    assert e.value.param == "kv_transfer_params"


def test_p_binds_its_params_to_the_prompt_and_signs_them():
    signed = sign_prefill(SECRET, HELD, PROMPT)
    assert handoff_signed(SECRET, signed) and signed["prompt_digest"]
    handoff = accept(signed, decode_args(), internal=False)  # honoured, and typed
    assert handoff == RemotePrefill(RemoteKV.from_kv_transfer_params(signed), 9)


def test_the_first_tokens_logprob_travels_signed_and_checked():
    logprob = TokenLogprob(9, -0.25, [(9, -0.25), (4, -float("inf"))])
    signed = sign_prefill(SECRET, HELD, PROMPT, logprob)
    handoff = accept(signed, decode_args(), internal=False)
    assert handoff.first_token_logprob == TokenLogprob(9, -0.25, [(9, -0.25), (4, -9999.0)])
    forged = sign_prefill(SECRET, HELD, PROMPT, replace(logprob, top=[(9, 1.5)]))
    refused(forged, decode_args(), False, "logprob")


@pytest.mark.parametrize("internal", [False, True])
def test_d_takes_only_its_own_prompts_signed_unexpired_hand_off(internal):
    signed = sign_prefill(SECRET, HELD, PROMPT)
    args = decode_args()
    refused(HELD.to_kv_transfer_params(None), args, internal, "signed")  # unsigned, even internal
    refused(signed | {"remote_block_ids": [8]}, args, internal, "signed")  # altered
    refused(sign_prefill(DeploymentSecret.from_text("x" * 20), HELD, PROMPT), args, internal,
            "signed")  # another deployment's
    refused(signed, args, internal, "another prompt", prompt=[1, 2, 3, 4, 6])
    refused(sign_prefill(SECRET, replace(HELD, expires_at=int(time.time()) - 1), PROMPT), args,
            internal, "expired")
    refused(sign_prefill(SECRET, replace(HELD, expires_at="soon"), PROMPT), args, internal,
            "expired")
    refused(signed, EngineArgs(role="colocated"), internal, "signed")  # no secret here


def test_holding_kv_needs_an_internal_call_or_the_flag():
    hold = {"do_remote_decode": True}
    prefill = EngineArgs(role="prefill", deployment_secret=SECRET)
    refused(hold, prefill, False, "internal to a pdserve deployment")
    assert accept(hold, prefill, internal=True) == HoldForDecode()
    flagged = EngineArgs(role="prefill", deployment_secret=SECRET, accept_client_kv_requests=True)
    assert accept(hold, flagged, internal=False) == HoldForDecode()


@pytest.mark.parametrize("params", [{"x": 1}, {"do_remote_decode": False, "lease": "t"}, "P1",
                                    [1]], ids=repr)
def test_anything_else_is_refused(params):
    refused(params, decode_args(), False, "kv_transfer_params")


@pytest.mark.parametrize("params", [None, {}, {"do_remote_decode": False, "do_remote_prefill":
                                               False, "remote_engine_id": None}], ids=repr)
def test_no_hand_off_is_a_plain_request(params):
    """vLLM's proxies write "no hand-off" with every flag false or null."""
    assert accept(params, decode_args(), internal=False) is None


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_p_and_d_need_the_secret(role):
    with pytest.raises(SecretError, match="PDSERVE_DEPLOYMENT_SECRET"):
        EngineArgs(role=role).require_deployment_secret()
    EngineArgs(role=role, deployment_secret=SECRET).require_deployment_secret()
    EngineArgs(role="colocated").require_deployment_secret()
