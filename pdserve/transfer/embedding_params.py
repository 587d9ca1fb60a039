"""Where an image's embedding rows wait on an encoder instance: the handle E answers
`/v1/encode` with, the router forwards to P, and P pulls the rows with.

`RemoteEmbedding.from_dict` is the one parser of that dict, with bounds on every field:
whatever arrives, it returns a typed handle or raises ValueError. The shape it promises
(`num_tokens` x `hidden_size`) is checked again against what P expects before a pull, and
against the header E sends before a byte of the rows is read (embedding_puller.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pdserve.transfer.layout import bounded_int
from pdserve.transfer.params import MAX_ID_CHARS, TRANSPORT_NAMES

EMBEDDING_DTYPES = ("float32", "bfloat16", "float16")
MAX_IMAGE_TOKENS = 1 << 16  # rows of one image: SmolVLM's largest (17 tiles x 64) is 1,088
MAX_HIDDEN = 1 << 16
_HEX = re.compile(r"[0-9a-f]{2,128}")


@dataclass(frozen=True)
class RemoteEmbedding:
    """One image's rows on an encoder's EmbeddingSource, held under a lease."""

    content_hash: str  # hex blake2b of the decoded pixels (multimodal.ImageInput's)
    num_tokens: int
    hidden_size: int
    dtype: str
    endpoint: dict  # EmbeddingSource.endpoint()
    lease_id: str  # the lease's key on E
    lease_token: str  # the capability that alone lets P read and release it

    def to_dict(self) -> dict:
        return {"content_hash": self.content_hash, "num_tokens": self.num_tokens,
                "hidden_size": self.hidden_size, "dtype": self.dtype,
                "endpoint": dict(self.endpoint), "lease_id": self.lease_id,
                "lease_token": self.lease_token}

    @classmethod
    def from_dict(cls, value: object, name: str = "handle") -> RemoteEmbedding:
        """Parse one handle; ValueError naming the field if anything is off."""
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a JSON object")
        content_hash = value.get("content_hash")
        if not isinstance(content_hash, str) or not _HEX.fullmatch(content_hash):
            raise ValueError(f"{name}.content_hash must be 2 to 128 lowercase hex digits")
        dtype = value.get("dtype")
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"{name}.dtype must be one of {EMBEDDING_DTYPES}")
        return cls(
            content_hash=content_hash,
            num_tokens=bounded_int(value.get("num_tokens"), f"{name}.num_tokens", 1,
                                   MAX_IMAGE_TOKENS),
            hidden_size=bounded_int(value.get("hidden_size"), f"{name}.hidden_size", 1,
                                    MAX_HIDDEN),
            dtype=dtype,
            endpoint=_endpoint(value.get("endpoint"), f"{name}.endpoint"),
            lease_id=_text(value.get("lease_id"), f"{name}.lease_id"),
            lease_token=_text(value.get("lease_token"), f"{name}.lease_token"),
        )


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ValueError(f"{name} must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def _endpoint(e: object, name: str) -> dict:
    """The source's address, rebuilt from its checked fields only."""
    if not isinstance(e, dict):
        raise ValueError(f"{name} must be a JSON object")
    transports = e.get("transports", ["tcp"])
    if not isinstance(transports, list) or not transports or len(transports) > len(
            TRANSPORT_NAMES) or any(t not in TRANSPORT_NAMES for t in transports):
        raise ValueError(f"{name}.transports must name some of {TRANSPORT_NAMES}")
    return {"host": _text(e.get("host"), f"{name}.host"),
            "port": bounded_int(e.get("port"), f"{name}.port", 1, 65535),
            "host_id": _text(e.get("host_id", "?"), f"{name}.host_id"),
            "transports": list(transports)}
