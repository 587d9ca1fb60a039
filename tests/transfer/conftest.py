"""A prefill-side source process in shared memory, shared by all the pull tests."""

from __future__ import annotations

import glob

import pytest
import torch

from pdserve.transfer.layout import KVLayout

from .source_process import TOKEN, deployment_secret, random_caches, start_source

LAYOUT = KVLayout(dtype="bfloat16", block_size=4, num_layers=3, num_kv_heads=4, head_dim=8)
NUM_BLOCKS = 24
SEED = 7
SECRET = deployment_secret()  # what every source and puller here proves to the other
T = TOKEN  # the lease token of every lease the pull tests hold


@pytest.fixture(scope="session")
def source():
    """A source process whose caches live in shared memory: serves host and tcp."""
    proc = start_source(LAYOUT, NUM_BLOCKS, SEED, shared=True)
    yield proc
    proc.stop()
    assert not glob.glob(f"/dev/shm/pdserve-kv-{proc.process.pid}-*"), "leaked shared memory"


@pytest.fixture(scope="session")
def remote_caches() -> list[torch.Tensor]:
    """What the source process holds, rebuilt here to compare bit for bit."""
    return random_caches(LAYOUT, NUM_BLOCKS, SEED)


def empty_caches(layout: KVLayout, num_blocks: int) -> list[torch.Tensor]:
    return [
        torch.zeros(layout.cache_shape(num_blocks), dtype=layout.torch_dtype)
        for _ in range(layout.num_layers)
    ]
