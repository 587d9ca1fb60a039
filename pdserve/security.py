"""The deployment's trust primitives: one shared secret, keys derived from it, and MACs.

Only the router and the instances of one deployment hold the secret; clients hold at most an
API key. The secret itself never travels: an internal HTTP call carries a MAC of (time,
nonce, method, path, body), a KV hand-off carries a MAC of its canonical JSON, and the KV
socket answers a challenge. Each use has its own key, derived from the secret by purpose,
so a MAC made for one use is worthless for another.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

SECRET_ENV = "PDSERVE_DEPLOYMENT_SECRET"  # what `pdserve up` hands its router and instances
API_KEY_ENV = "PDSERVE_API_KEY"  # the clients' key, where --api-key is not given
INTERNAL_AUTH_HEADER = "X-PDServe-Auth"  # the MAC of an internal HTTP call
HANDOFF_SIG_FIELD = "pdserve_sig"  # the MAC inside a signed kv_transfer_params
MIN_SECRET_BYTES = 16
REQUEST_WINDOW_S = 60.0  # an internal call older (or further in the future) than this is refused
MAX_REMEMBERED_NONCES = 200_000  # bounds the replay memory: beyond it, calls are refused


class SecretError(ValueError):
    """No usable deployment secret (absent, too short, unreadable)."""


@dataclass(frozen=True)
class DeploymentSecret:
    """The secret the router and instances of one deployment share."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) < MIN_SECRET_BYTES:
            raise SecretError(f"a deployment secret needs at least {MIN_SECRET_BYTES} bytes")

    @classmethod
    def generate(cls) -> DeploymentSecret:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_text(cls, text: str) -> DeploymentSecret:
        """Any string of at least 16 bytes (e.g. `openssl rand -hex 32`), surrounding space
        ignored."""
        return cls(text.strip().encode())

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DeploymentSecret | None:
        """`$PDSERVE_DEPLOYMENT_SECRET`, or None where it is unset or empty."""
        text = (os.environ if env is None else env).get(SECRET_ENV, "")
        return cls.from_text(text) if text.strip() else None

    @classmethod
    def from_file(cls, path: str | Path) -> DeploymentSecret:
        try:
            return cls.from_text(Path(path).read_text())
        except OSError as exc:
            raise SecretError(f"cannot read the deployment secret from {path}: {exc}") from exc

    def to_text(self) -> str:
        """A form that survives an environment variable (what `generate` made is binary)."""
        return self.key.decode() if _printable(self.key) else self.key.hex()

    def derive(self, purpose: str) -> bytes:
        """The key of one use ("http", "handoff", "kv-socket", ...)."""
        return hmac.new(self.key, b"pdserve/v1/" + purpose.encode(), hashlib.sha256).digest()

    def mac(self, purpose: str, data: bytes) -> str:
        return hmac.new(self.derive(purpose), data, hashlib.sha256).hexdigest()

    def verify(self, purpose: str, data: bytes, tag: object) -> bool:
        """Constant-time check of a MAC that came off the network (of any type)."""
        return isinstance(tag, str) and hmac.compare_digest(self.mac(purpose, data), tag)


def _printable(key: bytes) -> bool:
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return False
    return text.isprintable() and text.strip() == text


def load_secret(secret_file: str | None = None) -> DeploymentSecret | None:
    """The secret from `--secret-file`, else `$PDSERVE_DEPLOYMENT_SECRET`, else None."""
    return DeploymentSecret.from_file(secret_file) if secret_file else DeploymentSecret.from_env()


# ---- clients: an OpenAI-style API key --------------------------------------------------


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an `Authorization` header carries `Bearer <api_key>` (constant time)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and _same_text(token.strip(), api_key)


def _same_text(a: str, b: str) -> bool:
    """Constant-time equality of two strings from the network (lone surrogates included)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"),
                               b.encode("utf-8", "surrogatepass"))


# ---- internal HTTP calls: router <-> instances -----------------------------------------


def _request_message(stamp: str, nonce: str, method: str, path: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join([stamp, nonce, method.upper(), path, digest]).encode()


def sign_request(secret: DeploymentSecret, method: str, path: str, body: bytes = b"",
                 now: float | None = None) -> dict[str, str]:
    """The header that authenticates one internal call (bound to its method, path and body)."""
    stamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(12)
    mac = secret.mac("http", _request_message(stamp, nonce, method, path, body))
    return {INTERNAL_AUTH_HEADER: f"t={stamp};n={nonce};mac={mac}"}


class RequestVerifier:
    """Checks internal calls: a valid MAC, fresh, and never seen before (no replays)."""

    def __init__(self, secret: DeploymentSecret, window_s: float = REQUEST_WINDOW_S) -> None:
        self.secret = secret
        self.window_s = window_s
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def verify(self, header: str | None, method: str, path: str, body: bytes,
               now: float | None = None) -> bool:
        fields = _header_fields(header)
        if fields is None:
            return False
        stamp, nonce, mac = fields
        now = time.time() if now is None else now
        try:
            sent = float(stamp)
        except ValueError:
            return False
        if not abs(now - sent) <= self.window_s:  # also refuses NaN
            return False
        if not self.secret.verify("http", _request_message(stamp, nonce, method, path, body),
                                  mac):
            return False
        return self._first_use(nonce, now)

    def _first_use(self, nonce: str, now: float) -> bool:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if nonce in self._seen or len(self._seen) >= MAX_REMEMBERED_NONCES:
                return False
            self._seen[nonce] = now + 2 * self.window_s
            return True


def _header_fields(header: str | None) -> tuple[str, str, str] | None:
    if not header or len(header) > 256:
        return None
    parts = dict(p.partition("=")[::2] for p in header.split(";"))
    if set(parts) != {"t", "n", "mac"}:
        return None
    return parts["t"], parts["n"], parts["mac"]


# ---- the KV hand-off: P -> router -> D -------------------------------------------------


def _canonical(params: dict) -> bytes:
    """The bytes a hand-off's MAC covers: every field but the MAC, in one fixed form."""
    rest = {k: v for k, v in params.items() if k != HANDOFF_SIG_FIELD}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sign_handoff(secret: DeploymentSecret, params: dict) -> dict:
    """`params` with their MAC added (P signs what it hands to D through the router)."""
    return {**params, HANDOFF_SIG_FIELD: secret.mac("handoff", _canonical(params))}


def handoff_signed(secret: DeploymentSecret, params: dict) -> bool:
    """Whether a holder of the secret made `params` unchanged."""
    try:
        data = _canonical(params)
    except (TypeError, ValueError):  # not JSON-able, or NaN: nobody signed that
        return False
    return secret.verify("handoff", data, params.get(HANDOFF_SIG_FIELD))


def prompt_digest(token_ids: list[int]) -> str:
    """What binds a hand-off to one prompt: its KV is valid for these tokens only."""
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()


# ---- the KV socket: D proves it holds the secret before P serves it --------------------


def new_challenge() -> str:
    return secrets.token_hex(16)


def challenge_answer(secret: DeploymentSecret, challenge: str, side: str) -> str:
    """The answer to `challenge` from `side` ("puller" or "source": each proves itself)."""
    return secret.mac("kv-socket", f"{side}\n{challenge}".encode())


def new_capability() -> str:
    """An unguessable token that alone lets its holder read or release one lease."""
    return secrets.token_urlsafe(18)


def capability_matches(expected: str, offered: object) -> bool:
    return isinstance(offered, str) and _same_text(expected, offered)
