"""The host transport through P's staging buffer (caches not in shared memory, e.g. GPU)."""

from __future__ import annotations

import glob
import os
import threading

import pytest
import torch

from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.host import HostPuller
from pdserve.transfer.layout import HeadSlice
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.source import KVSource

from .conftest import LAYOUT, SECRET, T, empty_caches
from .source_process import random_caches

LAYER_OF_4_BLOCKS = 2 * 4 * LAYOUT.block_size * LAYOUT.num_kv_heads * LAYOUT.head_dim * 2


@pytest.fixture
def staged_source():
    """P's caches in private memory, served through a staging buffer of 1.5 layers of 4 blocks."""
    caches = random_caches(LAYOUT, 16, seed=3)
    leases = LeaseTable()
    source = KVSource(caches, LAYOUT, leases, staging_bytes=LAYER_OF_4_BLOCKS * 3 // 2,
                      secret=SECRET).start()
    yield source, leases, caches
    source.close()


def test_a_staged_source_offers_host(staged_source):
    source, _, _ = staged_source
    assert source.endpoint()["transports"] == ["host", "tcp"]


def test_staged_pull_is_bit_exact_layer_chunk_by_chunk(staged_source):
    source, leases, caches = staged_source
    leases.hold("r", [9, 2, 14, 5], token=T)
    local = empty_caches(LAYOUT, 8)
    stats = HostPuller(conns=SourceConnections(SECRET)).pull(
        source.endpoint(), "r", [9, 2, 14, 5], [7, 0, 3, 1], local, lease_token=T)
    assert stats.bytes == 4 * LAYOUT.bytes_per_block
    for mine, theirs in zip(local, caches):
        assert torch.equal(mine[:, [7, 0, 3, 1]], theirs[:, [9, 2, 14, 5]])


def test_staged_pull_of_half_the_heads(staged_source):
    source, leases, caches = staged_source
    leases.hold("r", [1, 2], token=T)
    local = [torch.zeros(2, 2, 4, 2, 8, dtype=torch.bfloat16) for _ in range(LAYOUT.num_layers)]
    HostPuller(conns=SourceConnections(SECRET)).pull(
        source.endpoint(), "r", [1, 2], [1, 0], local, HeadSlice(0, 0, 2, 0), lease_token=T)
    for mine, theirs in zip(local, caches):
        assert torch.equal(mine[:, [1, 0]], theirs[:, [1, 2], :, 0:2])


def test_a_pull_bigger_than_the_staging_buffer_fails_cleanly(staged_source):
    source, leases, _ = staged_source
    leases.hold("r", list(range(8)), token=T)
    with pytest.raises(TransferError, match="staging buffer"):
        HostPuller(conns=SourceConnections(SECRET)).pull(
            source.endpoint(), "r", list(range(8)), list(range(8)), empty_caches(LAYOUT, 8),
            lease_token=T)


def test_staging_needs_a_lease(staged_source):
    source, _, _ = staged_source
    with pytest.raises(TransferError, match="no live lease"):
        HostPuller(conns=SourceConnections(SECRET)).pull(
            source.endpoint(), "nobody", [1], [0], empty_caches(LAYOUT, 1), lease_token=T)


def test_concurrent_staged_pulls_take_turns(staged_source):
    source, leases, caches = staged_source
    results: list = []

    def pull(i: int) -> None:
        rid, ids = f"r{i}", [i, i + 4, i + 8]
        leases.hold(rid, ids, token=T)
        local = empty_caches(LAYOUT, 3)
        HostPuller(conns=SourceConnections(SECRET)).pull(
            source.endpoint(), rid, ids, [0, 1, 2], local, lease_token=T)
        results.append(all(torch.equal(m, t[:, ids]) for m, t in zip(local, caches)))

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_closing_the_source_unlinks_the_staging_file():
    source = KVSource(random_caches(LAYOUT, 2, 0), LAYOUT, LeaseTable(), staging_bytes=4096,
                      secret=SECRET)
    source.start()
    assert len(glob.glob(f"/dev/shm/pdserve-kv-{os.getpid()}-staging-*")) == 1
    source.close()
    assert glob.glob(f"/dev/shm/pdserve-kv-{os.getpid()}-staging-*") == []


def test_stage_outside_a_begun_read_is_refused(staged_source):
    from pdserve.transfer.wire import Connection

    source, leases, _ = staged_source
    leases.hold("r", [1, 2], token=T)
    stage = {"op": "stage", "lease_token": T, "request_id": "r", "block_ids": [1], "heads": None,
             "layers": [0, 1]}
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        with pytest.raises(TransferError, match="was begun"):
            conn.call(stage)
        conn.call({"op": "begin", "lease_token": T, "request_id": "r", "block_ids": [1]})
        assert conn.call(stage)["layers"]
