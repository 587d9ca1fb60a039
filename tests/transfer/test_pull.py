"""Pulling leased blocks from a source in another process, over host shared memory and tcp."""

from __future__ import annotations

import itertools
import socket
import time

import pytest
import torch

from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.host import HostPuller, local_host_id
from pdserve.transfer.layout import HeadSlice
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.tcp import TcpPuller

from .conftest import LAYOUT, SECRET, T, empty_caches

PULLERS = {"host": HostPuller, "tcp": TcpPuller}
_ids = itertools.count()


def request_id() -> str:
    return f"req-{next(_ids)}"


@pytest.fixture(params=sorted(PULLERS))
def puller(request):
    p = PULLERS[request.param](timeout_s=5.0, conns=SourceConnections(SECRET))
    yield p
    p.close()


def test_pull_copies_non_contiguous_blocks_bit_exact(source, remote_caches, puller):
    rid, remote_ids, local_ids = request_id(), [11, 2, 19, 5], [0, 9, 3, 15]
    source.call("hold", rid, [1, 2, 5, 11, 19, 23])
    local = empty_caches(LAYOUT, 16)
    stats = puller.pull(source.endpoint, rid, remote_ids, local_ids, local, lease_token=T)
    for mine, theirs in zip(local, remote_caches):
        assert torch.equal(mine[:, local_ids], theirs[:, remote_ids])
        untouched = [b for b in range(16) if b not in local_ids]
        assert not mine[:, untouched].any()
    assert stats.bytes == 4 * LAYOUT.bytes_per_block
    assert stats.num_blocks == 4 and stats.transport == puller.name


def test_pull_of_consecutive_blocks_bit_exact(source, remote_caches, puller):
    rid, remote_ids, local_ids = request_id(), list(range(8, 20)), list(range(2, 14))
    source.call("hold", rid, remote_ids)
    local = empty_caches(LAYOUT, 16)
    puller.pull(source.endpoint, rid, remote_ids, local_ids, local, lease_token=T)
    for mine, theirs in zip(local, remote_caches):
        assert torch.equal(mine[:, local_ids], theirs[:, remote_ids])
        assert not mine[:, [0, 1, 14, 15]].any()


def test_pull_half_the_heads_into_a_smaller_rank(source, remote_caches, puller):
    rid = request_id()
    source.call("hold", rid, [3, 4])
    half = type(LAYOUT)(**{**LAYOUT.to_dict(), "tp_size": 2, "tp_rank": 1})
    local = empty_caches(half, 4)
    puller.pull(source.endpoint, rid, [3, 4], [2, 0], local, HeadSlice(0, 2, 4, 0), lease_token=T)
    for mine, theirs in zip(local, remote_caches):
        assert mine.shape[3] == 2
        assert torch.equal(mine[:, [2, 0]], theirs[:, [3, 4], :, 2:4])


def test_pull_without_a_lease_is_refused(source, puller):
    with pytest.raises(TransferError, match="no live lease"):
        puller.pull(source.endpoint, request_id(), [1], [0], empty_caches(LAYOUT, 2), lease_token=T)


def test_pull_of_blocks_outside_the_lease_is_refused(source, puller):
    rid = request_id()
    source.call("hold", rid, [1, 2])
    with pytest.raises(TransferError, match="no live lease"):
        puller.pull(source.endpoint, rid, [2, 3], [0, 1], empty_caches(LAYOUT, 2), lease_token=T)


def test_release_ends_the_lease_and_hands_blocks_to_the_owner(source, puller):
    rid = request_id()
    source.call("expire")  # start from a clean slate
    source.call("hold", rid, [6, 8])
    puller.pull(source.endpoint, rid, [6, 8], [0, 1], empty_caches(LAYOUT, 2), lease_token=T)
    assert puller.release(source.endpoint, rid, T) is True
    assert puller.release(source.endpoint, rid, T) is False
    assert sorted(source.call("expire")) == [6, 8]
    with pytest.raises(TransferError, match="no live lease"):
        puller.pull(source.endpoint, rid, [6], [0], empty_caches(LAYOUT, 1), lease_token=T)


def test_a_pull_that_releases_ends_the_lease_in_the_same_exchange(source, remote_caches, puller):
    rid = request_id()
    source.call("expire")
    source.call("hold", rid, [6, 8])
    local = empty_caches(LAYOUT, 2)
    stats = puller.pull(source.endpoint, rid, [6, 8], [0, 1], local, release=True, lease_token=T)
    assert stats.released is True
    for mine, theirs in zip(local, remote_caches):
        assert torch.equal(mine, theirs[:, [6, 8]])  # read under a pin, then released
    # behind the pull's `end` on the one connection: answered once that is carried out
    assert puller.release(source.endpoint, rid, T) is False  # nothing left to release
    assert sorted(source.call("expire")) == [6, 8]
    unreleased = request_id()
    source.call("hold", unreleased, [3])
    assert puller.pull(source.endpoint, unreleased, [3], [0], local,
                       lease_token=T).released is False
    assert source.call("expire") == []  # a plain pull leaves the lease to D's release


def test_a_refused_queued_copy_is_waited_for_before_the_pull_fails(in_process_source):
    from pdserve.transfer.connections import admitted_copy
    from pdserve.transfer.wire import Connection

    source, leases = in_process_source
    events = []
    with (Connection(source.endpoint(), 5.0, secret=SECRET) as conn,
          pytest.raises(TransferError, match="no live")):
        admitted_copy(conn, "never-held", [0], lambda: events.append("copy") or 0,
                      lambda: events.append("finish"), lease_token=T)
    assert events == ["copy", "finish"]  # D's blocks are not handed back mid-copy
    leases.hold("held", [1], token=T)
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        nbytes, live, released = admitted_copy(conn, "held", [1], lambda: 7,
                                               lambda: events.append("finish"), release=True,
                                               lease_token=T)
        conn.call({"op": "ping"})  # `end` went unanswered: P has carried it out by now
    assert (nbytes, live, released) == (7, True, True) and "held" not in leases


def test_a_source_nobody_listens_on_fails_fast(puller):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused
    endpoint = {
        "host": "127.0.0.1",
        "port": port,
        "transports": ["host", "tcp"],
        "host_id": local_host_id(),
    }
    start = time.monotonic()
    with pytest.raises(TransferError):
        puller.pull(endpoint, "r", [0], [0], empty_caches(LAYOUT, 1), lease_token=T)
    assert time.monotonic() - start < 2


def test_a_source_that_never_answers_times_out(puller):
    puller.timeout_s = 1.0
    with socket.socket() as s:  # accepts connections (backlog) but never replies
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        endpoint = {
            "host": "127.0.0.1",
            "port": s.getsockname()[1],
            "transports": ["host", "tcp"],
            "host_id": local_host_id(),
        }
        start = time.monotonic()
        with pytest.raises(TransferError, match="timed out|TimeoutError|timeout"):
            puller.pull(endpoint, "r", [0], [0], empty_caches(LAYOUT, 1), lease_token=T)
        assert time.monotonic() - start < 3


def test_mismatched_block_lists_are_a_caller_bug(source, puller):
    with pytest.raises(ValueError):
        puller.pull(source.endpoint, "r", [0, 1], [0], empty_caches(LAYOUT, 1), lease_token=T)


def test_bad_block_ids_fail_the_pull_not_the_source(source, remote_caches, puller):
    rid = request_id()
    source.call("hold", rid, [1, 999])  # 999 is past the end of P's cache
    with pytest.raises(TransferError):
        puller.pull(source.endpoint, rid, [1, 999], [0, 1], empty_caches(LAYOUT, 2), lease_token=T)
    local = empty_caches(LAYOUT, 1)
    puller.pull(source.endpoint, rid, [1], [0], local, lease_token=T)  # the source still serves
    assert torch.equal(local[0][:, 0], remote_caches[0][:, 1])


def test_garbage_on_the_socket_does_not_stop_the_source(source):
    from pdserve.transfer.wire import Connection, send_msg

    with socket.create_connection((source.endpoint["host"], source.endpoint["port"])) as s:
        s.sendall(b"\x00\x00\x00\x05hello")
    with Connection(source.endpoint, 5.0, secret=SECRET) as conn:
        send_msg(conn.sock, {"op": "read"})  # missing fields
        with pytest.raises(TransferError, match="bad request"):
            conn.recv()
        assert conn.call({"op": "ping"})["layout"] == LAYOUT.to_dict()


@pytest.fixture
def in_process_source():
    """A source in this process (threads), so a test can meddle with its lease table."""
    from pdserve.transfer.host import allocate_shared_kv_caches
    from pdserve.transfer.host import unlink_shared_kv_caches as unlink
    from pdserve.transfer.lease import LeaseTable
    from pdserve.transfer.source import KVSource

    caches = allocate_shared_kv_caches(LAYOUT, 4, "in-process")
    leases = LeaseTable()
    source = KVSource(caches, LAYOUT, leases, shm_name="in-process", read_timeout_s=5,
                      secret=SECRET).start()
    yield source, leases
    source.close()
    unlink("in-process")


def test_a_source_that_answers_not_live_fails_the_pull(in_process_source, puller, monkeypatch):
    from pdserve.transfer import connections

    source, leases = in_process_source
    leases.hold("r", [0, 1], token=T)
    monkeypatch.setattr(connections, "PIN_MARGIN", 0.0)  # a copy too slow to trust the pin
    monkeypatch.setattr(leases, "end_read", lambda *a, **k: False)  # P lost the read's pin
    with pytest.raises(TransferError, match="ended during"):
        puller.pull(source.endpoint(), "r", [0, 1], [0, 1], empty_caches(LAYOUT, 2), lease_token=T)


def test_a_source_that_stalls_mid_stream_times_out():
    """The tcp deadline covers the whole stream, not just each recv."""
    import threading

    from pdserve.transfer.handshake import prove_source
    from pdserve.transfer.wire import recv_msg, send_msg

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def stall() -> None:
            conn, _ = server.accept()
            assert prove_source(conn, SECRET)  # a source of the deployment, if a slow one
            recv_msg(conn)
            send_msg(conn, {"num_layers": LAYOUT.num_layers})
            send_msg(
                conn, {"layer": 0, "shape": [2, 1, 4, 4, 8], "dtype": "bfloat16", "nbytes": 512}
            )
            for _ in range(40):  # trickle a byte every 50 ms: each recv succeeds, the pull not
                time.sleep(0.05)
                try:
                    conn.sendall(b"\0")
                except OSError:
                    break
            conn.close()

        thread = threading.Thread(target=stall, daemon=True)
        thread.start()
        endpoint = {"host": "127.0.0.1", "port": server.getsockname()[1], "transports": ["tcp"]}
        start = time.monotonic()
        with pytest.raises(TransferError):
            TcpPuller(timeout_s=0.5, conns=SourceConnections(SECRET)).pull(
                endpoint, "r", [0], [0], empty_caches(LAYOUT, 1), lease_token=T)
        assert time.monotonic() - start < 1.5
        thread.join(5)


def test_host_transport_needs_shared_caches(in_process_source):
    source, _ = in_process_source
    endpoint = {**source.endpoint(), "transports": ["tcp"]}  # what a non-shared source says
    with pytest.raises(TransferError, match="serving it"):
        HostPuller(conns=SourceConnections(SECRET)).pull(
            endpoint, "r", [0], [0], empty_caches(LAYOUT, 1), lease_token=T)
