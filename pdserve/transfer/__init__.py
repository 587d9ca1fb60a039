"""KV transfer between engine instances: leases on P, pulls on D, three transports.

P side (engine rank):  allocate_shared_kv_caches (CPU) -> LeaseTable + KVSource(...).start();
                       hold a lease per finished prefill, free what `expire` returns.
D side (engine rank):  KVPuller(layout, kv_caches).pull(RemoteKV.from_kv_transfer_params(p), ...),
                       then release; on TransferError / IncompatibleLayout prefill locally.
"""

from pdserve.transfer.host import (
    allocate_shared_kv_caches,
    remove_stale_shared_kv_caches,
    unlink_shared_kv_caches,
)
from pdserve.transfer.layout import HeadSlice, IncompatibleLayout, KVLayout
from pdserve.transfer.lease import KVLease, LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import PullStats, TransferError
from pdserve.transfer.source import KVSource
from pdserve.transfer.transports import (
    TRANSPORTS,
    KVPuller,
    choose_transport,
    release_remote_kv,
)

__all__ = [
    "TRANSPORTS",
    "HeadSlice",
    "IncompatibleLayout",
    "KVLayout",
    "KVLease",
    "KVPuller",
    "KVSource",
    "LeaseTable",
    "PullStats",
    "RemoteKV",
    "TransferError",
    "allocate_shared_kv_caches",
    "choose_transport",
    "release_remote_kv",
    "remove_stale_shared_kv_caches",
    "unlink_shared_kv_caches",
]
