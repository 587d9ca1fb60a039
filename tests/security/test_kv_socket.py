"""Findings 2 and 5 on the KV socket: only holders of the deployment secret talk to a KV
source, only a lease's token reads or releases it, and D maps only pdserve's own files."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import torch

from pdserve.security import DeploymentSecret, challenge_answer
from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.handshake import prove_source
from pdserve.transfer.host import HostPuller, allocate_shared_kv_caches, unlink_shared_kv_caches
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.source import KVSource
from pdserve.transfer.transports import KVPuller
from pdserve.transfer.wire import Connection, recv_msg, send_msg

LAYOUT = KVLayout(dtype="float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=4)
SECRET = DeploymentSecret.from_text("kv-socket-test-secret-0123456789")
OTHER = DeploymentSecret.from_text("another-deployment-secret-987654")


@pytest.fixture
def source():
    name = f"sock-{uuid.uuid4().hex[:6]}"
    caches = allocate_shared_kv_caches(LAYOUT, 8, name)
    for i, c in enumerate(caches):
        c.copy_(torch.arange(c.numel(), dtype=torch.float32).view(c.shape) + i)
    src = KVSource(caches, LAYOUT, LeaseTable(), shm_name=name, read_timeout_s=5.0,
                   secret=SECRET).start()
    yield src
    src.close()
    unlink_shared_kv_caches(name)


def raw(source: KVSource) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", source.port), 5)
    sock.settimeout(5)
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the source hung up (instead of answering)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_client_that_skips_the_challenge_gets_nothing(source):
    with raw(source) as sock:
        assert "challenge" in recv_msg(sock)  # the first thing P says
        send_msg(sock, {"op": "open", "transport": "host"})  # finding 5: P's whole file
        assert closed(sock)
    assert source.refused_handshakes == 1


def test_a_wrong_answer_closes_the_connection_before_ping(source):
    with raw(source) as sock:
        hello = recv_msg(sock)
        send_msg(sock, {"answer": challenge_answer(OTHER, hello["challenge"], "puller"),
                        "challenge": "c2"})
        assert closed(sock)
    with pytest.raises(TransferError):  # another deployment's D is refused the same way
        Connection(source.endpoint(), 5.0, secret=OTHER).call({"op": "ping"})
    assert source.refused_handshakes == 2


def test_a_puller_with_the_secret_is_served(source):
    with Connection(source.endpoint(), 5.0, secret=SECRET) as conn:
        assert conn.call({"op": "ping"})["layout"] == LAYOUT.to_dict()
    assert source.refused_handshakes == 0


def fake_source(script) -> socket.socket:
    """A server that runs `script(conn)` on its first connection."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            script(conn)

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_d_refuses_a_source_without_the_secret():
    answered = []

    def impostor(conn: socket.socket) -> None:  # finding 2: anyone can listen somewhere
        send_msg(conn, {"challenge": "abc"})
        reply = recv_msg(conn)
        answered.append(reply)
        send_msg(conn, {"answer": "0" * 64})  # it cannot answer D's challenge
        answered.append(recv_msg(conn))  # whatever D sends next (nothing: D hangs up)

    with fake_source(impostor) as server:
        port = server.getsockname()[1]
        remote = RemoteKV("p", "r", [0], LAYOUT, [{"host": "127.0.0.1", "port": port,
                                                   "transports": ["tcp"]}], "tok")
        puller = KVPuller(LAYOUT, LAYOUT.zeros(1, "cpu"), transport="tcp", timeout_s=3.0,
                          secret=SECRET)
        with pytest.raises(TransferError, match="did not prove"):
            puller.pull(remote, [0])
        puller.close()
        deadline = time.monotonic() + 10  # the impostor's thread reads D's hang-up last
        while len(answered) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert answered[0]["answer"] != SECRET.key.decode()  # the secret never travels
    assert answered[1] is None  # no read or release frame reached the impostor


def test_d_maps_only_pdserve_kv_files():
    """Even a source that answers the challenge cannot make D map another file."""

    def rogue(conn: socket.socket) -> None:
        assert prove_source(conn, SECRET)
        recv_msg(conn)  # open
        send_msg(conn, {"mapping": {"path": "/etc/passwd", "size": 16, "dtype": "float32",
                                    "layers": [{"offset": 0, "shape": [1]}]}})
        recv_msg(conn)

    with fake_source(rogue) as server:
        endpoint = {"host": "127.0.0.1", "port": server.getsockname()[1],
                    "transports": ["host", "tcp"], "host_id": _here()}
        puller = HostPuller(timeout_s=3.0, conns=SourceConnections(SECRET))
        with pytest.raises(TransferError, match="not a pdserve KV file"):
            puller.pull(endpoint, "r", [0], [0], LAYOUT.zeros(1, "cpu"), lease_token="t")
        puller.close()


def _here() -> str:
    from pdserve.transfer.host import local_host_id

    return local_host_id()


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/shm/other", "/dev/shm/../etc/x",
                                  "/dev/shm/sub/pdserve-kv-1", "relative/pdserve-kv-1", 5])
def test_check_shared_path_refuses_other_files(path):
    from pdserve.transfer.host import check_shared_path

    with pytest.raises(ValueError):
        check_shared_path(path)


def test_a_lease_is_read_and_released_only_with_its_token(source):
    token = source.leases.hold("cmpl-1", [1, 2]).token
    local = LAYOUT.zeros(2, "cpu")
    puller = HostPuller(timeout_s=3.0, conns=SourceConnections(SECRET))
    for guess in ("", "cmpl-1", token[:-1] + "x"):  # the request id alone grants nothing
        with pytest.raises(TransferError, match="lease_token"):
            puller.pull(source.endpoint(), "cmpl-1", [1, 2], [0, 1], local, lease_token=guess)
        assert puller.release(source.endpoint(), "cmpl-1", guess) is False
    assert "cmpl-1" in source.leases
    puller.pull(source.endpoint(), "cmpl-1", [1, 2], [0, 1], local, lease_token=token)
    assert puller.release(source.endpoint(), "cmpl-1", token) is True
    puller.close()
