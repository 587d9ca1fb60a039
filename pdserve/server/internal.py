"""Whether a request to this instance is an internal call from the deployment's router.

An internal call carries `X-PDServe-Auth`, a MAC over its method, path and body made with the
deployment secret (docs/DESIGN.md, Trust model). Internal-only request fields (`resume`) are
honoured only on such calls.
"""

from __future__ import annotations

from fastapi import Request

from pdserve.security import INTERNAL_AUTH_HEADER, RequestVerifier


async def internal_call(request: Request) -> bool:
    """True for a call the deployment's router made: either a middleware verified it
    already (`request.state.internal`), or its MAC checks here. Reads the (cached) body."""
    if getattr(request.state, "internal", False):
        return True
    header = request.headers.get(INTERNAL_AUTH_HEADER)
    verifier = _verifier(request)
    if header is None or verifier is None:
        return False
    ok = verifier.verify(header, request.method, request.url.path, await request.body())
    request.state.internal = ok  # a nonce verifies once: remember the verdict
    return ok


def _verifier(request: Request) -> RequestVerifier | None:
    """The instance's one verifier (its nonce memory refuses replays); None: no secret."""
    secret = request.app.state.server.client.args.deployment_secret
    if secret is None:
        return None
    verifier = getattr(request.app.state, "request_verifier", None)
    if verifier is None or verifier.secret is not secret:
        verifier = request.app.state.request_verifier = RequestVerifier(secret)
    return verifier
