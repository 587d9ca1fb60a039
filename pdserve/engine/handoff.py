"""A request's part in P/D disaggregation, typed: vLLM's `kv_transfer_params` parsed once,
at the instance's edge, with bounds. The engine and its scheduler see only these values.

    {"do_remote_decode": true}                  -> HoldForDecode   (on P)
    P's answer: {"do_remote_prefill": true, ...} -> RemotePrefill   (on D)
    absent, {}, or every flag false             -> None            (a plain request)

On D the answer starts with P's first token and goes on from there: the whole completion,
as vLLM's decode instances answer (its P/D proxies drop P's output). pdserve's router, which
streams P's token to the client at once, says so with `resume` and gets the rest only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.engine.outputs import TokenLogprob
from pdserve.transfer.layout import bounded_int
from pdserve.transfer.params import RemoteKV

MAX_TOP_LOGPROBS = 20  # the most alternatives a request may ask for (server/protocol.py)
LOGPROB_FLOOR = -9999.0  # -inf as vLLM writes it: JSON has no infinity, and D refuses one


@dataclass(frozen=True)
class HoldForDecode:
    """P: prefill, sample the first token, and keep the prompt's KV under a lease for D."""


@dataclass(frozen=True)
class RemotePrefill:
    """D: P prefilled the prompt (its KV is at `remote`) and sampled `first_token_id`."""

    remote: RemoteKV
    first_token_id: int
    first_token_logprob: TokenLogprob | None = None  # when the client asked for logprobs


KVHandoff = HoldForDecode | RemotePrefill


@dataclass(frozen=True)
class HeldPrefill:
    """P: a finished prefill whose KV the engine holds under a lease until D pulls it."""

    remote: RemoteKV
    first_token_id: int
    expires_at: int  # the lease's end, unix seconds (wall clock: D is another process)

    def to_kv_transfer_params(self, first_token_logprob: TokenLogprob | None) -> dict:
        """The dict P answers with (the server then binds it to the prompt and signs it)."""
        params = self.remote.to_kv_transfer_params() | {
            "first_token_id": self.first_token_id, "expires_at": self.expires_at}
        if first_token_logprob is not None:
            params["first_token_logprob"] = logprob_to_dict(first_token_logprob)
        return params


def parse_kv_transfer_params(params: object, vocab_size: int) -> KVHandoff | None:
    """The typed hand-off of a request's kv_transfer_params; ValueError if malformed."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ValueError("kv_transfer_params must be a JSON object")
    if params.get("do_remote_prefill"):
        first = bounded_int(params.get("first_token_id"), "first_token_id", 0, vocab_size - 1)
        logprob = params.get("first_token_logprob")
        return RemotePrefill(RemoteKV.from_kv_transfer_params(params), first,
                             None if logprob is None else logprob_from_dict(logprob, first,
                                                                            vocab_size))
    if params.get("do_remote_decode"):
        return HoldForDecode()
    if any(v not in (None, False) for v in params.values()):
        raise ValueError("kv_transfer_params must ask do_remote_decode or do_remote_prefill")
    return None  # vLLM's shape of "no hand-off": every field false or null


def logprob_to_dict(lp: TokenLogprob) -> dict:
    return {"token_id": lp.token_id, "logprob": max(lp.logprob, LOGPROB_FLOOR),
            "top": [[token, max(value, LOGPROB_FLOOR)] for token, value in lp.top]}


def logprob_from_dict(d: object, token_id: int, vocab_size: int) -> TokenLogprob:
    """The first token's logprob as P sent it, checked like any input."""
    if not isinstance(d, dict) or d.get("token_id") != token_id:
        raise ValueError("first_token_logprob must be an object for first_token_id")
    top = d.get("top")
    if not isinstance(top, list) or len(top) > MAX_TOP_LOGPROBS:
        raise ValueError(f"first_token_logprob.top must list at most {MAX_TOP_LOGPROBS}")
    pairs = []
    for entry in top:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ValueError("first_token_logprob.top entries must be [token_id, logprob]")
        pairs.append((bounded_int(entry[0], "first_token_logprob.top[][0]", 0,
                                  vocab_size - 1), _logprob(entry[1])))
    return TokenLogprob(token_id, _logprob(d.get("logprob")), pairs)


def _logprob(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value > 0:
        raise ValueError("a logprob must be a finite number, 0 or less")
    return float(value)
