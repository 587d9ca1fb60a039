"""The KV hand-off at an instance's edge: P signs what it hands out, D checks what it takes.

P's engine holds a finished prefill's KV and returns its kv_transfer_params (with the
lease's `lease_token` and `expires_at`); the server binds them to the prompt
(`prompt_digest`) and signs them with the deployment secret. Any instance honours a
request's kv_transfer_params only as docs/DESIGN.md "Trust model" says: a pull
(`do_remote_prefill`) only from a hand-off a P of this deployment signed, unexpired, for
this very prompt; a hold (`do_remote_decode`) only from an internal call (or with
--accept-client-kv-requests); nothing else from a client. What passes is parsed here,
once, with bounds, into the typed hand-off the engine takes (engine/handoff.py); a
malformed one is a 400.
"""

from __future__ import annotations

import math
import time

from pdserve.config import EngineArgs
from pdserve.engine.handoff import (
    HeldPrefill,
    HoldForDecode,
    KVHandoff,
    parse_kv_transfer_params,
)
from pdserve.engine.outputs import TokenLogprob
from pdserve.security import (
    DeploymentSecret,
    handoff_signed,
    prompt_digest,
    sign_handoff,
)
from pdserve.server.errors import bad_request

PARAM = "kv_transfer_params"
UNSIGNED = f"{PARAM} must be a hand-off signed by a prefill instance of this deployment"
OTHER_PROMPT = f"{PARAM} were made for another prompt: a hand-off moves KV to its own prompt only"
EXPIRED = f"{PARAM} expired: the prefill instance no longer holds that KV"
INTERNAL = f"{PARAM} are internal to a pdserve deployment"


def sign_prefill(secret: DeploymentSecret | None, held: HeldPrefill, prompt_ids: list[int],
                 first_token_logprob: TokenLogprob | None = None) -> dict:
    """P: the kv_transfer_params of a held prefill, bound to the prompt and signed
    (unsigned without a secret, which no D of a deployment accepts)."""
    params = held.to_kv_transfer_params(first_token_logprob)
    bound = params | {"prompt_digest": prompt_digest(prompt_ids)}
    return bound if secret is None else sign_handoff(secret, bound)


def accept_handoff(params: dict | None, prompt_ids: list[int], args: EngineArgs,
                   internal: bool, vocab_size: int, now: float | None = None
                   ) -> KVHandoff | None:
    """The typed hand-off of a request's kv_transfer_params, if it may be honoured here;
    a 400 APIError otherwise. `internal`: the call carried a valid internal MAC."""
    if isinstance(params, dict) and params.get("do_remote_prefill"):
        check_handoff(params, prompt_ids, args.deployment_secret, now)  # signed: P's own
    try:
        handoff = parse_kv_transfer_params(params, vocab_size)
    except ValueError as exc:
        raise bad_request(f"{PARAM}: {exc}", PARAM) from exc
    if isinstance(handoff, HoldForDecode) and not (internal or args.accept_client_kv_requests):
        raise bad_request(INTERNAL, PARAM)  # a hold: from the router, or a trusted proxy
    return handoff


def check_handoff(params: dict, prompt_ids: list[int], secret: DeploymentSecret | None,
                  now: float | None = None) -> None:
    """D: a 400 APIError unless a P of this deployment signed `params` for this prompt and
    they have not expired."""
    if secret is None or not handoff_signed(secret, params):
        raise bad_request(UNSIGNED, PARAM)
    expires_at = params.get("expires_at")
    if (type(expires_at) not in (int, float) or not math.isfinite(expires_at)
            or expires_at <= (time.time() if now is None else now)):
        raise bad_request(EXPIRED, PARAM)
    if params.get("prompt_digest") != prompt_digest(prompt_ids):
        raise bad_request(OTHER_PROMPT, PARAM)
