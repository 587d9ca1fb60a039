"""cuda_ipc between two processes (GPU only): P's CUDA caches mapped by D, bit-exact pulls.

With 2+ GPUs the decode caches live on cuda:1, so the gather reads over peer access.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.cuda_ipc import CudaIpcPuller
from pdserve.transfer.host import HostPuller
from pdserve.transfer.layout import HeadSlice, KVLayout
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.tcp import TcpPuller
from pdserve.transfer.transports import KVPuller

from .conftest import SECRET, T
from .source_process import random_caches, start_source

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LAYOUT = KVLayout(dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=8, head_dim=128)
NUM_BLOCKS, SEED = 64, 21


@pytest.fixture(scope="module")
def gpu_source():
    # a 512 KiB staging buffer also serves "host": one layer of 5 blocks (320 KiB) at a time
    proc = start_source(LAYOUT, NUM_BLOCKS, SEED, device="cuda:0", staging_bytes=512 << 10)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def expected():
    return random_caches(LAYOUT, NUM_BLOCKS, SEED)  # built on CPU: same bits as P's


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)


def empty(layout: KVLayout, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
    shape = layout.cache_shape(num_blocks)
    dtype = layout.torch_dtype
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]


def test_source_offers_cuda_ipc(gpu_source):
    assert gpu_source.endpoint["transports"] == ["cuda_ipc", "host", "tcp"]


@pytest.mark.parametrize("puller_cls", [CudaIpcPuller, HostPuller, TcpPuller])
def test_pull_is_bit_exact(gpu_source, expected, device, puller_cls):
    rid = f"gpu-{puller_cls.__name__}"
    gpu_source.call("hold", rid, [40, 3, 17, 8, 63])
    local = empty(LAYOUT, 10, device)
    puller = puller_cls()
    stats = puller.pull(gpu_source.endpoint, rid, [40, 3, 17, 8, 63], [9, 0, 4, 5, 2], local,
                        lease_token=T)
    assert stats.bytes == 5 * LAYOUT.bytes_per_block
    for mine, theirs in zip(local, expected):
        assert torch.equal(mine[:, [9, 0, 4, 5, 2]].cpu(), theirs[:, [40, 3, 17, 8, 63]])
    assert puller.release(gpu_source.endpoint, rid, T)


def test_pull_half_the_heads(gpu_source, expected, device):
    gpu_source.call("hold", "gpu-half", [1, 2])
    half = KVLayout(**{**LAYOUT.to_dict(), "tp_size": 2, "tp_rank": 1})
    local = empty(half, 2, device)
    CudaIpcPuller(conns=SourceConnections(SECRET)).pull(
        gpu_source.endpoint, "gpu-half", [1, 2], [1, 0], local, HeadSlice(0, 4, 8, 0),
        lease_token=T)
    for mine, theirs in zip(local, expected):
        assert torch.equal(mine[:, [1, 0]].cpu(), theirs[:, [1, 2], :, 4:8])


def block_ids(kind: str) -> tuple[list[int], list[int]]:
    """40 (remote, local) block ids: one run on both sides, or random in both pools."""
    if kind == "contiguous":
        return list(range(10, 50)), list(range(40))
    g = torch.Generator().manual_seed(3)
    remote = torch.randperm(NUM_BLOCKS, generator=g)[:40].tolist()
    return remote, torch.randperm(48, generator=g)[:40].tolist()


@pytest.mark.parametrize("kind", ["scattered", "contiguous"])
@pytest.mark.parametrize(
    "heads,local_heads",
    [(None, 8), (HeadSlice(0, 4, 8, 0), 4), (HeadSlice(0, 2, 6, 3), 8)],
    ids=["all", "half", "mid"],
)
def test_kernel_pull_matches_the_torch_path(gpu_source, expected, device, kind, heads, local_heads):
    remote_ids, local_ids = block_ids(kind)
    rid = f"gpu-kernel-{kind}-{local_heads}-{heads}"
    gpu_source.call("hold", rid, remote_ids)
    shape = (2, 48, LAYOUT.block_size, local_heads, LAYOUT.head_dim)
    by_kernel, by_torch = (
        [torch.zeros(shape, dtype=LAYOUT.torch_dtype, device=device) for _ in expected]
        for _ in range(2)
    )
    for caches, kernel in ((by_kernel, True), (by_torch, False)):
        puller = CudaIpcPuller(kernel=kernel, conns=SourceConnections(SECRET))
        puller.pull(gpu_source.endpoint, rid, remote_ids, local_ids, caches, heads,
                    lease_token=T)
    part = heads or HeadSlice(0, 0, LAYOUT.num_kv_heads, 0)
    for mine, torch_path, theirs in zip(by_kernel, by_torch, expected):
        assert torch.equal(mine.view(torch.int16), torch_path.view(torch.int16))
        got = mine[:, local_ids, :, part.local_start : part.local_stop].cpu()
        assert torch.equal(got, theirs[:, remote_ids, :, part.remote_start : part.remote_stop])


def test_pull_without_lease_is_refused(gpu_source, device):
    with pytest.raises(TransferError, match="no live lease"):
        CudaIpcPuller(conns=SourceConnections(SECRET)).pull(
            gpu_source.endpoint, "nobody", [1], [0], empty(LAYOUT, 1, device), lease_token=T)


def test_kv_puller_picks_cuda_ipc(gpu_source, expected, device):
    gpu_source.call("hold", "gpu-auto", [5])
    remote = RemoteKV("p", "gpu-auto", [5], LAYOUT, gpu_source.endpoints, T)
    local = empty(LAYOUT, 1, device)
    stats = KVPuller(LAYOUT, local, secret=SECRET).pull(remote, [0])
    assert stats.transport == "cuda_ipc"
    assert torch.equal(local[0][:, [0]].cpu(), expected[0][:, [5]])
