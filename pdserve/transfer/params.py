"""What P tells the router about a finished prefill: vLLM's kv_transfer_params plus pdserve's.

vLLM's fields (do_remote_prefill, remote_engine_id, remote_host, remote_port,
remote_block_ids, remote_request_id, tp_size) keep ecosystem proxies working; pdserve adds
the KV layout and one source endpoint per prefill TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.transfer.layout import KVLayout


@dataclass
class RemoteKV:
    """Where a request's prefilled KV blocks are, as D needs it to pull them."""

    engine_id: str
    request_id: str
    block_ids: list[int]
    layout: KVLayout  # of P's rank 0; tp_size says how many endpoints there are
    endpoints: list[dict]  # KVSource.endpoint() of each P rank, in rank order

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
        }

    @classmethod
    def from_kv_transfer_params(cls, params: dict) -> RemoteKV:
        """Parse what the router forwarded to D; ValueError if it is not a pdserve prefill."""
        try:
            layout = KVLayout.from_dict(params["kv_layout"])
            endpoints = list(params["kv_endpoints"])
            remote = cls(
                engine_id=str(params["remote_engine_id"]),
                request_id=str(params["remote_request_id"]),
                block_ids=[int(b) for b in params["remote_block_ids"]],
                layout=layout,
                endpoints=endpoints,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"kv_transfer_params lacks pdserve's fields: {e}") from e
        if len(endpoints) != layout.tp_size:
            raise ValueError(f"{len(endpoints)} endpoints for a TP={layout.tp_size} prefill")
        return remote
