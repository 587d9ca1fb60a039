"""What P tells the router about a finished prefill: vLLM's kv_transfer_params plus pdserve's.

vLLM's fields (do_remote_prefill, remote_engine_id, remote_host, remote_port,
remote_block_ids, remote_request_id, tp_size) keep ecosystem proxies working; pdserve adds
the KV layout, one source endpoint per prefill TP rank, and the lease's capability.

`RemoteKV.from_kv_transfer_params` is the one parser of that dict, with bounds on every
field: whatever arrives, it returns a typed hand-off or raises ValueError (never another
exception, which would take down the engine that parses it).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.transfer.layout import KVLayout, bounded_int

TRANSPORT_NAMES = ("cuda_ipc", "host", "tcp")
MAX_BLOCK_ID = 2**31 - 1
MAX_BLOCKS = 1 << 16  # a 1M-token prompt in 16-token blocks
MAX_ID_CHARS = 256  # request ids, engine ids, host names, tokens
MAX_TP = 1024


@dataclass
class RemoteKV:
    """Where a request's prefilled KV blocks are, as D needs it to pull them."""

    engine_id: str
    request_id: str
    block_ids: list[int]
    layout: KVLayout  # of P's rank 0; tp_size says how many endpoints there are
    endpoints: list[dict]  # KVSource.endpoint() of each P rank, in rank order
    lease_token: str = ""  # the capability that alone lets D read and release the lease

    def to_kv_transfer_params(self) -> dict:
        """The dict P returns in its response's kv_transfer_params."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_host": self.endpoints[0]["host"],
            "remote_port": self.endpoints[0]["port"],
            "remote_block_ids": list(self.block_ids),
            "remote_request_id": self.request_id,
            "tp_size": self.layout.tp_size,
            "kv_layout": self.layout.to_dict(),
            "kv_endpoints": self.endpoints,
            "lease_token": self.lease_token,
        }

    @classmethod
    def from_kv_transfer_params(cls, params: object) -> RemoteKV:
        """Parse what the router forwarded to D; ValueError if it is not a pdserve prefill."""
        if not isinstance(params, dict):
            raise ValueError("kv_transfer_params must be a JSON object")
        missing = [k for k in ("kv_layout", "kv_endpoints", "remote_engine_id",
                               "remote_request_id", "remote_block_ids", "lease_token")
                   if k not in params]
        if missing:
            raise ValueError(f"kv_transfer_params lacks pdserve's fields: {missing}")
        layout = KVLayout.from_dict(params["kv_layout"])
        endpoints = _list(params["kv_endpoints"], "kv_endpoints", MAX_TP)
        if len(endpoints) != layout.tp_size:
            raise ValueError(f"{len(endpoints)} endpoints for a TP={layout.tp_size} prefill")
        if "tp_size" in params and params["tp_size"] != layout.tp_size:
            raise ValueError("kv_transfer_params.tp_size differs from kv_layout.tp_size")
        blocks = _block_ids(params["remote_block_ids"])
        return cls(
            engine_id=_text(params["remote_engine_id"], "remote_engine_id"),
            request_id=_text(params["remote_request_id"], "remote_request_id"),
            block_ids=[bounded_int(b, "remote_block_ids[]", 0, MAX_BLOCK_ID) for b in blocks],
            layout=layout,
            endpoints=[_endpoint(e, rank) for rank, e in enumerate(endpoints)],
            lease_token=_text(params["lease_token"], "lease_token"),
        )


def _block_ids(value: object) -> list:
    """Flat ids (pdserve's), or vLLM's one list per KV cache group: a model with one group
    (full attention in every layer, as every model pdserve serves) sends `[[ids]]`."""
    blocks = _list(value, "remote_block_ids", MAX_BLOCKS)
    if blocks and all(isinstance(group, list) for group in blocks):
        if len(blocks) != 1:
            raise ValueError("remote_block_ids has several KV cache groups; pdserve models "
                             "have one")
        blocks = _list(blocks[0], "remote_block_ids[0]", MAX_BLOCKS)
    return blocks


def _text(value: object, name: str, max_chars: int = MAX_ID_CHARS) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        raise ValueError(f"{name} must be a string of 1 to {max_chars} characters")
    return value


def _list(value: object, name: str, max_len: int) -> list:
    if not isinstance(value, list) or len(value) > max_len:
        raise ValueError(f"{name} must be a list of at most {max_len} entries")
    return value


def _endpoint(e: object, rank: int) -> dict:
    """One P rank's KVSource.endpoint(), rebuilt from its checked fields only."""
    name = f"kv_endpoints[{rank}]"
    if not isinstance(e, dict):
        raise ValueError(f"{name} must be a JSON object")
    transports = _list(e.get("transports", ["tcp"]), f"{name}.transports", len(TRANSPORT_NAMES))
    if not transports or any(t not in TRANSPORT_NAMES for t in transports):
        raise ValueError(f"{name}.transports must name some of {TRANSPORT_NAMES}")
    gpu_uuid = e.get("gpu_uuid")
    if gpu_uuid is not None:
        _text(gpu_uuid, f"{name}.gpu_uuid")
    device = e.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{name}.device must be 'cpu' or 'cuda'")
    return {
        "host": _text(e.get("host"), f"{name}.host"),
        "port": bounded_int(e.get("port"), f"{name}.port", 1, 65535),
        "host_id": _text(e.get("host_id", "?"), f"{name}.host_id"),
        "transports": list(transports),
        "device": device,
        "tp_rank": bounded_int(e.get("tp_rank", rank), f"{name}.tp_rank", rank, rank),
        "gpu_uuid": gpu_uuid,
    }
