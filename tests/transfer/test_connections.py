"""D keeps one connection per source across pulls and releases, and survives P closing it."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import torch

from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.handshake import prove_source
from pdserve.transfer.host import HostPuller, allocate_shared_kv_caches, unlink_shared_kv_caches
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.source import KVSource
from pdserve.transfer.tcp import TcpPuller
from pdserve.transfer.transports import KVPuller
from pdserve.transfer.wire import recv_msg, send_msg

from .conftest import LAYOUT, SECRET, T, empty_caches
from .source_process import random_caches

NUM_BLOCKS = 8
PULLERS = {"host": HostPuller, "tcp": TcpPuller}


@pytest.fixture
def make_source():
    """Start in-process sources (shared-memory caches from a seed); closes them after."""
    started: list[KVSource] = []

    def make(seed: int, port: int = 0, read_timeout_s: float = 5.0) -> KVSource:
        name = f"conn-{seed}-{uuid.uuid4().hex[:6]}"
        caches = allocate_shared_kv_caches(LAYOUT, NUM_BLOCKS, name)
        for dst, src in zip(caches, random_caches(LAYOUT, NUM_BLOCKS, seed)):
            dst.copy_(src)
        source = KVSource(caches, LAYOUT, LeaseTable(), port=port, shm_name=name,
                          read_timeout_s=read_timeout_s, secret=SECRET)
        started.append(source.start())
        return source

    yield make
    for source in started:
        source.close()
        unlink_shared_kv_caches(source.shm_name)


@pytest.fixture(params=sorted(PULLERS))
def puller(request):
    p = PULLERS[request.param](timeout_s=5.0, conns=SourceConnections(SECRET))
    yield p
    p.close()


def pull_and_check(puller, source: KVSource, seed: int, rid: str, remote_ids: list[int]) -> None:
    source.leases.hold(rid, remote_ids, token=T)
    local = empty_caches(LAYOUT, len(remote_ids))
    local_ids = list(range(len(remote_ids)))[::-1]
    puller.pull(source.endpoint(), rid, remote_ids, local_ids, local, lease_token=T)
    for mine, theirs in zip(local, random_caches(LAYOUT, NUM_BLOCKS, seed)):
        assert torch.equal(mine[:, local_ids], theirs[:, remote_ids])


def test_two_pulls_and_a_release_share_one_connection(make_source, puller):
    source = make_source(seed=1)
    pull_and_check(puller, source, 1, "a", [3, 5])
    pull_and_check(puller, source, 1, "b", [6, 0, 2])
    assert puller.release(source.endpoint(), "a", T) is True
    assert source.connections_accepted == 1
    assert len(puller.conns) == 1


def test_kv_puller_pulls_and_releases_over_one_connection(make_source):
    source = make_source(seed=2)
    source.leases.hold("r", [4, 1, 7], token=T)
    remote = RemoteKV("p", "r", [4, 1, 7], LAYOUT, [source.endpoint()], T)
    local = empty_caches(LAYOUT, 3)
    puller = KVPuller(LAYOUT, local, secret=SECRET)
    puller.pull(remote, [0, 1])
    puller.pull(remote, [2], first_block=2)
    assert puller.release(remote)
    assert source.connections_accepted == 1
    for mine, theirs in zip(local, random_caches(LAYOUT, NUM_BLOCKS, 2)):
        assert torch.equal(mine, theirs[:, [4, 1, 7]])
    puller.close()
    assert sorted(source.leases.expire()) == [1, 4, 7]


def test_a_connection_the_source_closed_while_idle_is_redialed(make_source, puller):
    source = make_source(seed=3, read_timeout_s=0.2)
    pull_and_check(puller, source, 3, "a", [1, 2])
    time.sleep(0.6)  # P closes the idle connection
    pull_and_check(puller, source, 3, "b", [5, 4])
    assert puller.release(source.endpoint(), "b", T) is True
    assert source.connections_accepted == 2


def test_a_source_restarted_on_the_same_port_is_redialed_and_remapped(make_source, puller):
    old = make_source(seed=4)
    pull_and_check(puller, old, 4, "a", [0, 3])
    old.close()
    new = make_source(seed=5, port=old.port)  # other caches, in another shared-memory file
    pull_and_check(puller, new, 5, "a", [0, 3])  # the bytes of the new source, not a stale map
    assert new.connections_accepted == 1


def test_a_failed_pull_closes_its_connection(make_source, puller):
    source = make_source(seed=6)
    with pytest.raises(TransferError, match="no live lease"):
        puller.pull(source.endpoint(), "nobody", [1], [0], empty_caches(LAYOUT, 1), lease_token=T)
    assert len(puller.conns) == 0
    pull_and_check(puller, source, 6, "a", [1])
    assert source.connections_accepted == 2


def scripted_source(replies: list[list[dict | None]]) -> tuple[socket.socket, list[int]]:
    """A raw server: connection i answers its messages with replies[i] (None: hang up)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = [0]

    def serve() -> None:
        for script in replies:
            conn, _ = server.accept()
            accepted[0] += 1
            with conn:
                assert prove_source(conn, SECRET)
                for reply in script:
                    recv_msg(conn)
                    if reply is None:
                        break
                    send_msg(conn, reply)

    threading.Thread(target=serve, daemon=True).start()
    return server, accepted


def test_a_request_that_races_the_idle_close_is_sent_again_once():
    # the first connection answers once, then hangs up on the next request unanswered
    server, accepted = scripted_source([[{"released": True}, None], [{"released": True}]])
    with server:
        endpoint = {"host": "127.0.0.1", "port": server.getsockname()[1]}
        puller = TcpPuller(timeout_s=2.0, conns=SourceConnections(SECRET))
        assert puller.release(endpoint, "a", T) is True
        assert puller.release(endpoint, "b", T) is True  # on a second connection
        assert accepted[0] == 2
        puller.close()


def test_a_new_connection_closed_before_the_reply_is_not_retried():
    server, accepted = scripted_source([[None], [{"released": True}]])
    with server:
        endpoint = {"host": "127.0.0.1", "port": server.getsockname()[1]}
        with pytest.raises(TransferError, match="closed"):
            TcpPuller(timeout_s=2.0, conns=SourceConnections(SECRET)).release(endpoint, "a", T)
        time.sleep(0.1)
        assert accepted[0] == 1
