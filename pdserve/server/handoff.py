"""The KV hand-off at an instance's edge: P signs what it hands out, D checks what it takes.

P's engine holds a finished prefill's KV and returns its kv_transfer_params (with the
lease's `lease_token` and `expires_at`); the server binds them to the prompt
(`prompt_digest`) and signs them with the deployment secret. Any instance honours a
request's kv_transfer_params only as docs/DESIGN.md "Trust model" says: a pull
(`do_remote_prefill`) only from a hand-off a P of this deployment signed, unexpired, for
this very prompt; a hold (`do_remote_decode`) only from an internal call (or with
--accept-client-kv-requests); nothing else from a client. What passes is parsed with
bounds once, by the engine (RemoteKV.from_kv_transfer_params: a ValueError is a 400), so
that the server process never imports torch.
"""

from __future__ import annotations

import math
import time

from pdserve.config import EngineArgs
from pdserve.engine.outputs import EngineRequest
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


def sign_prefill(secret: DeploymentSecret | None, params: dict, prompt_ids: list[int]) -> dict:
    """P: the engine's kv_transfer_params bound to the prompt and signed (unsigned without a
    secret, which no D of a deployment accepts)."""
    bound = params | {"prompt_digest": prompt_digest(prompt_ids)}
    return bound if secret is None else sign_handoff(secret, bound)


def check_kv_transfer_params(req: EngineRequest, args: EngineArgs, internal: bool,
                             now: float | None = None) -> None:
    """Raise a 400 APIError unless `req`'s kv_transfer_params may be honoured here.

    `internal`: the HTTP call carried a valid internal MAC (the router's)."""
    params = req.kv_transfer_params
    if params is None:
        return
    if not isinstance(params, dict):
        raise bad_request(INTERNAL, PARAM)
    if params.get("do_remote_prefill"):
        check_handoff(params, req.prompt_token_ids, args.deployment_secret, now)
    elif params.get("do_remote_decode"):
        if not (internal or args.accept_client_kv_requests):
            raise bad_request(INTERNAL, PARAM)
    elif not internal:
        raise bad_request(INTERNAL, PARAM)


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
