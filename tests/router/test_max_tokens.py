"""One max_tokens rule for the router, as the instances read it: in chat, max_completion_tokens
wins; completions ignore it. Load accounting and the P-alone decision both follow it."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.pairing import max_tokens_field, requested_max_tokens
from pdserve.router.proxy import Load, NoInstance, _needs_decode, release_reason
from pdserve.router.registry import Instance
from pdserve.router.upstream import Refused, UpstreamError

BOTH = {"max_tokens": 5, "max_completion_tokens": 50}


def test_chat_takes_max_completion_tokens_over_max_tokens():
    assert max_tokens_field(BOTH, chat=True) == 50
    assert requested_max_tokens(BOTH, chat=True) == 50


def test_completions_ignore_max_completion_tokens():
    assert max_tokens_field(BOTH, chat=False) == 5
    assert requested_max_tokens({"max_completion_tokens": 50}, chat=False, default=16) == 16


def test_chat_falls_back_to_max_tokens_when_the_newer_name_is_null():
    body = {"max_tokens": 7, "max_completion_tokens": None}
    assert requested_max_tokens(body, chat=True) == 7


@pytest.mark.parametrize("value", [None, 0, -3, "9", 2.0, True])
def test_an_unset_or_bad_value_is_charged_as_the_default(value):
    assert requested_max_tokens({"max_tokens": value}, chat=False, default=123) == 123


def test_load_and_the_p_alone_decision_read_the_same_field():
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
            "max_completion_tokens": 1}
    assert Load.of(body, chat=True).max_tokens == 1
    assert not _needs_decode(body, chat=True)  # one token: P alone
    assert Load.of(body, chat=False).max_tokens == 40
    assert _needs_decode(body, chat=False)


def test_release_reasons():
    inst = Instance("http://d", ("decode",))
    assert release_reason(NoInstance("none")) == "no_decode"
    assert release_reason(Refused(400, b"{}")) == "decode_refused"
    assert release_reason(UpstreamError(inst, "HTTP 503", connect=False)) == "decode_failed"
    assert release_reason(asyncio.CancelledError()) == "client_disconnect"
    assert release_reason(GeneratorExit()) == "client_disconnect"
