"""The tcp transport streams layers through two host buffers each side, reused across pulls."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.handshake import prove_source
from pdserve.transfer.layout import HeadSlice, KVLayout
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.tcp import NUM_SLOTS, TcpPuller
from pdserve.transfer.wire import Connection, recv_exact, recv_msg, send_msg, send_tensor

from .conftest import SECRET, T, empty_caches
from .source_process import random_caches, start_source

# more layers than buffers; a whole pull (12 MiB) more than the sockets queue between the ends
LAYOUT = KVLayout(dtype="bfloat16", block_size=16, num_layers=12, num_kv_heads=4, head_dim=64)
NUM_BLOCKS = 64
SEED = 23


@pytest.fixture(scope="module")
def source():
    """A source process with plain CPU caches: it serves tcp alone."""
    proc = start_source(LAYOUT, NUM_BLOCKS, SEED)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def remote_caches() -> list[torch.Tensor]:
    return random_caches(LAYOUT, NUM_BLOCKS, SEED)


@pytest.fixture
def puller():
    p = TcpPuller(timeout_s=10.0, conns=SourceConnections(SECRET))
    yield p
    p.close()


def caches_with_heads(num_heads: int, num_blocks: int, device: str = "cpu") -> list[torch.Tensor]:
    shape = (2, num_blocks, LAYOUT.block_size, num_heads, LAYOUT.head_dim)
    return [
        torch.zeros(shape, dtype=LAYOUT.torch_dtype, device=device)
        for _ in range(LAYOUT.num_layers)
    ]


# (remote blocks, local blocks, heads, local heads): growing, shrinking, head slices
PULLS = [
    ([31, 2, 17, 8, 25], [4, 0, 9, 1, 12], None, 4),
    ([40, 3, 59, 11, 7, 22, 50, 1, 36, 14, 63, 28], [*range(11, -1, -1)], HeadSlice(0, 1, 3, 0), 2),
    ([5], [3], HeadSlice(0, 2, 4, 1), 3),
    (list(range(60, 20, -2)), list(range(0, 40, 2)), None, 4),
]


def check(local, remote_caches, remote_ids, local_ids, heads) -> None:
    span = slice(None) if heads is None else slice(heads.remote_start, heads.remote_stop)
    into = slice(None) if heads is None else slice(heads.local_start, heads.local_stop)
    for mine, theirs in zip(local, remote_caches):
        mine = mine.cpu().clone()
        assert torch.equal(mine[:, local_ids][:, :, :, into], theirs[:, remote_ids][:, :, :, span])
        mine[:, local_ids, :, into] = 0
        assert not mine.any()  # nothing else written: other blocks, other heads


def test_consecutive_pulls_over_one_connection_are_bit_exact(source, remote_caches, puller):
    assert LAYOUT.num_layers > NUM_SLOTS
    for n, (remote_ids, local_ids, heads, local_heads) in enumerate(PULLS):
        rid = f"many-{n}"
        source.call("hold", rid, remote_ids)
        local = caches_with_heads(local_heads, 40)
        stats = puller.pull(source.endpoint, rid, remote_ids, local_ids, local, heads,
                            lease_token=T)
        check(local, remote_caches, remote_ids, local_ids, heads)
        width = local_heads if heads is None else heads.num_heads
        assert stats.bytes == len(remote_ids) * LAYOUT.bytes_per_block * width // 4
        assert len(puller.conns) == 1  # the same connection carried every pull
        source.call("release", rid)


def test_receive_buffers_are_allocated_once(source, puller):
    source.call("hold", "buffers", list(range(16)))
    local = empty_caches(LAYOUT, 16)
    puller.pull(source.endpoint, "buffers", list(range(16)), list(range(16)), local, lease_token=T)
    first = [slot._buf.data_ptr() for slot in puller._landing.slots]
    puller.pull(source.endpoint, "buffers", list(range(16)), list(range(16)), local, lease_token=T)
    puller.pull(source.endpoint, "buffers", [3, 1], [0, 1], local,
                lease_token=T)  # smaller: same buffers
    assert [slot._buf.data_ptr() for slot in puller._landing.slots] == first
    source.call("release", "buffers")


def cut_source(cut_layer: int, num_blocks: int) -> socket.socket:
    """A raw source that streams whole layers up to `cut_layer`, half of it, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    shape = [2, num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim]
    data = torch.ones(shape, dtype=LAYOUT.torch_dtype)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            assert prove_source(conn, SECRET)
            recv_msg(conn)
            send_msg(conn, {"num_layers": LAYOUT.num_layers})
            for i in range(cut_layer):
                send_tensor(conn, {"layer": i}, data)
            header = {"layer": cut_layer, "shape": shape, "dtype": "bfloat16"}
            send_msg(conn, {**header, "nbytes": data.nbytes})
            conn.sendall(bytes(data.nbytes // 2))

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_a_stream_cut_mid_layer_fails_the_pull_and_the_puller_pulls_again(
    source, remote_caches, puller
):
    with cut_source(cut_layer=NUM_SLOTS + 1, num_blocks=3) as server:
        endpoint = {"host": "127.0.0.1", "port": server.getsockname()[1], "transports": ["tcp"]}
        with pytest.raises(TransferError, match="closed"):
            puller.pull(endpoint, "cut", [0, 1, 2], [0, 1, 2], empty_caches(LAYOUT, 3),
                        lease_token=T)
    source.call("hold", "after-cut", [9, 4, 33])
    local = empty_caches(LAYOUT, 8)
    puller.pull(source.endpoint, "after-cut", [9, 4, 33], [7, 2, 5], local, lease_token=T)
    check(local, remote_caches, [9, 4, 33], [7, 2, 5], None)


def test_a_reader_that_hangs_up_mid_layer_leaves_the_source_serving(
    source, remote_caches, puller
):
    everything = list(range(NUM_BLOCKS))
    source.call("hold", "hang-up", everything)
    with Connection(source.endpoint, 10.0, secret=SECRET) as conn:
        read = {"op": "read", "lease_token": T, "request_id": "hang-up", "block_ids": everything,
                "heads": None}
        assert conn.call(read)["num_layers"] == LAYOUT.num_layers
        header = conn.recv()
        assert header["layer"] == 0
        recv_exact(conn.sock, memoryview(bytearray(header["nbytes"] // 3)))
    local = empty_caches(LAYOUT, NUM_BLOCKS)  # the lease is still there: pull it all
    puller.pull(source.endpoint, "hang-up", everything, everything[::-1], local, lease_token=T)
    check(local, remote_caches, everything, everything[::-1], None)
    source.call("release", "hang-up")


def test_a_failed_scatter_fails_the_pull_and_the_next_pull_works(source, remote_caches, puller):
    source.call("hold", "scatter", [6, 7])
    with pytest.raises(TransferError):  # block 9 is past the end of D's 4 blocks
        puller.pull(source.endpoint, "scatter", [6, 7], [0, 9], empty_caches(LAYOUT, 4),
                    lease_token=T)
    local = empty_caches(LAYOUT, 4)
    puller.pull(source.endpoint, "scatter", [6, 7], [3, 0], local, lease_token=T)
    check(local, remote_caches, [6, 7], [3, 0], None)
    source.call("release", "scatter")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_to_gpu_pulls_through_pinned_buffers_are_bit_exact(remote_caches):
    gpu_source = start_source(LAYOUT, NUM_BLOCKS, SEED, device="cuda")
    puller = TcpPuller(timeout_s=10.0, conns=SourceConnections(SECRET))
    try:
        for n, (remote_ids, local_ids, heads, local_heads) in enumerate(PULLS):
            gpu_source.call("hold", f"gpu-{n}", remote_ids)
            local = caches_with_heads(local_heads, 40, "cuda")
            puller.pull(gpu_source.endpoint, f"gpu-{n}", remote_ids, local_ids, local, heads,
                        lease_token=T)
            check(local, remote_caches, remote_ids, local_ids, heads)
        assert all(slot.pinned for slot in puller._landing.slots)
    finally:
        puller.close()
        gpu_source.stop()
