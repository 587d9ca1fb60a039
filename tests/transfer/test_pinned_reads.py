"""An admitted read pins its lease on P, so D's `end` needs no answer."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from pdserve.transfer import connections as connections_module
from pdserve.transfer.connections import SourceConnections, admitted_copy
from pdserve.transfer.host import HostPuller, allocate_shared_kv_caches, unlink_shared_kv_caches
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.source import KVSource
from pdserve.transfer.wire import Connection, PeerClosed

from .conftest import LAYOUT, SECRET, T, empty_caches
from .source_process import random_caches

NUM_BLOCKS = 8
SEED = 11


@pytest.fixture
def source():
    """A source in this process, so a test can end leases while D reads."""
    name = f"pinned-{uuid.uuid4().hex[:6]}"
    caches = allocate_shared_kv_caches(LAYOUT, NUM_BLOCKS, name)
    for dst, src in zip(caches, random_caches(LAYOUT, NUM_BLOCKS, SEED)):
        dst.copy_(src)
    source = KVSource(caches, LAYOUT, LeaseTable(), shm_name=name, read_timeout_s=5.0,
                      secret=SECRET).start()
    yield source
    source.close()
    unlink_shared_kv_caches(name)


def freed_within(leases: LeaseTable, timeout_s: float = 2.0) -> list[int]:
    """What `expire` hands back, waiting for P's server thread to end a read."""
    deadline = time.monotonic() + timeout_s
    while not (freed := leases.expire()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return sorted(freed)


def synced(conn: Connection) -> None:
    """A round trip behind an unanswered `end`: P has carried the `end` out by its answer."""
    assert "layout" in conn.call({"op": "ping"})  # and not a stray answer to the `end`


def test_a_release_during_a_read_is_carried_out_when_the_read_ends(source):
    leases = source.leases
    leases.hold("r", [2, 5], token=T)
    seen = []

    def copy() -> int:  # D copies; meanwhile D's release, the router's and P's abort arrive
        with Connection(source.endpoint(), 5.0, secret=SECRET) as other:
            seen.append(other.call({"op": "release", "lease_token": T,
                                    "request_id": "r"})["released"])
        seen.append(leases.expire())
        return 0

    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        _, live, _ = admitted_copy(conn, "r", [2, 5], copy, lease_token=T)
        assert seen == [True, []] and live  # ended at once, but not freed under the read
        synced(conn)
        assert sorted(leases.expire()) == [2, 5]


def test_a_lease_that_expires_during_a_read_is_freed_when_the_read_ends(source):
    leases = source.leases
    leases.hold("r", [1], ttl_s=0.05, token=T)
    seen = []

    def copy() -> int:
        time.sleep(0.1)  # past the TTL, well within P's pin
        seen.append(leases.expire())
        return 0

    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        _, live, _ = admitted_copy(conn, "r", [1], copy, lease_token=T)
        assert live and seen == [[]] and "r" not in leases
        synced(conn)
        assert leases.expire() == [1]


def test_a_connection_closed_mid_read_ends_its_read(source):
    leases = source.leases
    leases.hold("r", [3, 4], token=T)
    conn = Connection(source.endpoint(), 5.0, secret=SECRET)
    conn.call({"op": "begin", "lease_token": T, "request_id": "r", "block_ids": [3]})
    assert leases.release_later("r", T) and leases.expire() == []
    conn.close()  # D died after `begin`, before `end`
    assert freed_within(leases) == [3, 4]


def test_a_lease_ended_before_begin_is_refused(source):
    source.leases.hold("r", [1], token=T)
    source.leases.release_later("r", T)
    with (Connection(source.endpoint(), 5.0, secret=SECRET) as conn,
          pytest.raises(TransferError, match="no live")):
        conn.call({"op": "begin", "lease_token": T, "request_id": "r", "block_ids": [1]})


def test_an_unanswered_end_leaves_the_connection_for_the_next_pull_and_release(source):
    leases, puller = source.leases, HostPuller(timeout_s=5.0, conns=SourceConnections(SECRET))
    leases.hold("a", [0, 6], token=T)
    leases.hold("b", [7], token=T)
    local = empty_caches(LAYOUT, 2)
    assert puller.pull(source.endpoint(), "a", [0, 6], [1, 0], local, release=True,
                       lease_token=T).released
    assert puller.pull(source.endpoint(), "b", [7], [0], local, lease_token=T).released is False
    assert puller.release(source.endpoint(), "b", T) is True
    assert puller.release(source.endpoint(), "a", T) is False  # the first pull's `end` ended it
    assert sorted(leases.expire()) == [0, 6, 7] and len(leases) == 0
    assert source.connections_accepted == 1
    for mine, theirs in zip(local, random_caches(LAYOUT, NUM_BLOCKS, SEED)):
        assert torch.equal(mine[:, 0], theirs[:, 7])
    puller.close()


def test_two_concurrent_reads_each_pin_the_lease(source):
    leases = source.leases
    leases.hold("r", [1, 2], token=T)
    with (Connection(source.endpoint(), 5.0, secret=SECRET) as rank0,
          Connection(source.endpoint(), 5.0, secret=SECRET) as rank1):
        begin = {"op": "begin", "lease_token": T, "request_id": "r", "block_ids": [1, 2]}
        id0 = rank0.call(begin)["lease_id"]
        id1 = rank1.call(begin)["lease_id"]
        assert leases.release_later("r", T)
        rank0.send({"op": "end", "lease_token": T, "request_id": "r", "lease_id": id0,
                    "reply": False})
        synced(rank0)
        assert leases.expire() == []  # rank 1 still copies
        rank1.send({"op": "end", "lease_token": T, "request_id": "r", "lease_id": id1,
                    "reply": False})
        synced(rank1)
        assert sorted(leases.expire()) == [1, 2]


def test_an_unanswered_end_gets_no_answer_even_when_malformed(source):
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        conn.send({"op": "end", "reply": False})  # no request or lease id
        synced(conn)


def test_an_end_that_asks_is_still_answered(source):
    source.leases.hold("r", [1], token=T)
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        lease_id = conn.call({"op": "begin", "lease_token": T, "request_id": "r",
                              "block_ids": [1]})["lease_id"]
        ended = conn.call({"op": "end", "lease_token": T, "request_id": "r", "lease_id": lease_id,
                           "release": True})
    assert ended == {"live": True, "released": True} and source.leases.expire() == [1]


def test_a_copy_slower_than_the_pin_asks_for_the_answer(source, monkeypatch):
    monkeypatch.setattr(connections_module, "PIN_MARGIN", 0.0)
    source.leases.hold("r", [1], token=T)
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        copied = admitted_copy(conn, "r", [1], lambda: 0, release=True, lease_token=T)
        assert copied == (0, True, True)
        assert conn.replies == 2  # `begin`'s and `end`'s
    assert source.leases.expire() == [1]


def test_an_end_that_could_not_be_sent_leaves_the_release_to_d(source, monkeypatch):
    leases = source.leases
    leases.hold("r", [1], token=T)
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        send = conn.send

        def cut_before_end(msg: dict) -> None:
            if msg["op"] == "end":
                raise PeerClosed("cut")
            send(msg)

        monkeypatch.setattr(conn, "send", cut_before_end)
        copied = admitted_copy(conn, "r", [1], lambda: 9, release=True, lease_token=T)
        assert copied == (9, True, False)
        assert not conn.is_open()  # closed, so P ends the read and D dials again
    assert "r" in leases  # still held: D releases it explicitly
    assert leases.release_later("r", T) and freed_within(leases) == [1]  # once P saw the close


def test_a_tcp_read_that_fails_leaves_no_pin(source):
    from pdserve.transfer.tcp import TcpPuller

    source.leases.hold("r", [1, 999], token=T)  # 999 is past the end of P's cache
    puller = TcpPuller(timeout_s=5.0, conns=SourceConnections(SECRET))
    with pytest.raises(TransferError):
        puller.pull(source.endpoint(), "r", [1, 999], [0, 1], empty_caches(LAYOUT, 2),
                    lease_token=T)
    puller.close()
    assert source.leases.release_later("r", T) and sorted(source.leases.expire()) == [1, 999]
