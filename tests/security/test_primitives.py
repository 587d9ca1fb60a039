"""The deployment secret's primitives: MACs that bind what they cover, refuse replays and
never accept a forgery or a MAC made for another use."""

import pytest

from pdserve.security import (
    HANDOFF_SIG_FIELD,
    INTERNAL_AUTH_HEADER,
    DeploymentSecret,
    RequestVerifier,
    SecretError,
    bearer_matches,
    capability_matches,
    challenge_answer,
    handoff_signed,
    prompt_digest,
    sign_handoff,
    sign_request,
)

SECRET = DeploymentSecret.from_text("a-deployment-secret-of-some-length")
OTHER = DeploymentSecret.from_text("another-secret-of-the-same-length!")


def test_short_or_missing_secret_is_refused():
    with pytest.raises(SecretError):
        DeploymentSecret.from_text("short")
    assert DeploymentSecret.from_env({}) is None
    assert DeploymentSecret.from_env({"PDSERVE_DEPLOYMENT_SECRET": "  "}) is None


def test_generated_secret_survives_an_environment_variable():
    secret = DeploymentSecret.generate()
    again = DeploymentSecret.from_env({"PDSERVE_DEPLOYMENT_SECRET": secret.to_text()})
    assert again.mac("x", b"data") == DeploymentSecret.from_text(secret.to_text()).mac("x", b"data")


def test_secret_is_not_in_its_repr():
    assert "deployment-secret" not in repr(SECRET)


def test_keys_differ_by_purpose():
    assert SECRET.mac("http", b"m") != SECRET.mac("handoff", b"m")
    assert not SECRET.verify("handoff", b"m", SECRET.mac("http", b"m"))


def test_bearer():
    assert bearer_matches("Bearer k1", "k1")
    assert bearer_matches("bearer k1", "k1")
    assert not bearer_matches("Bearer k2", "k1")
    assert not bearer_matches("k1", "k1")
    assert not bearer_matches(None, "k1")
    assert not bearer_matches("Bearer \ud800", "k1")


def _verify(verifier, headers, method="POST", path="/register", body=b"{}", now=None):
    return verifier.verify(headers.get(INTERNAL_AUTH_HEADER), method, path, body, now=now)


def test_request_mac_binds_method_path_and_body():
    verifier = RequestVerifier(SECRET)
    assert _verify(verifier, sign_request(SECRET, "POST", "/register", b"{}"))
    assert not _verify(verifier, sign_request(SECRET, "POST", "/deregister", b"{}"))
    assert not _verify(verifier, sign_request(SECRET, "POST", "/register", b"{ }"))
    assert not _verify(verifier, sign_request(SECRET, "GET", "/register", b"{}"))
    assert not _verify(verifier, sign_request(OTHER, "POST", "/register", b"{}"))


def test_request_mac_refuses_replays_and_stale_calls():
    verifier = RequestVerifier(SECRET, window_s=60)
    headers = sign_request(SECRET, "POST", "/register", b"{}", now=1000.0)
    assert _verify(verifier, headers, now=1001.0)
    assert not _verify(verifier, headers, now=1002.0)  # the same call again
    stale = sign_request(SECRET, "POST", "/register", b"{}", now=1000.0)
    assert not _verify(verifier, stale, now=1100.0)


@pytest.mark.parametrize("header", [None, "", "t=1;n=2", "garbage", "t=nan;n=x;mac=y",
                                    "t=1;n=2;mac=3;x=4", "x" * 1000])
def test_malformed_auth_headers_are_refused(header):
    assert not RequestVerifier(SECRET).verify(header, "POST", "/", b"")


def test_handoff_signature_covers_every_field():
    params = {"remote_block_ids": [1, 2], "kv_endpoints": [{"host": "127.0.0.1", "port": 9}]}
    signed = sign_handoff(SECRET, params)
    assert HANDOFF_SIG_FIELD in signed and handoff_signed(SECRET, signed)
    assert not handoff_signed(OTHER, signed)
    moved = {**signed, "kv_endpoints": [{"host": "10.0.0.1", "port": 9}]}
    assert not handoff_signed(SECRET, moved)
    assert not handoff_signed(SECRET, params)  # unsigned
    assert not handoff_signed(SECRET, {**signed, "x": float("nan")})
    assert not handoff_signed(SECRET, {**signed, HANDOFF_SIG_FIELD: 7})


def test_challenge_answers_differ_by_side():
    assert challenge_answer(SECRET, "c", "puller") != challenge_answer(SECRET, "c", "source")
    assert challenge_answer(SECRET, "c", "puller") != challenge_answer(OTHER, "c", "puller")


def test_prompt_digest_and_capability():
    assert prompt_digest([1, 23]) != prompt_digest([12, 3])
    assert capability_matches("abc", "abc")
    assert not capability_matches("abc", "abd")
    assert not capability_matches("abc", None)
    assert not capability_matches("abc", "\ud800")
