"""Shared-memory KV caches: allocation, sharing, and no /dev/shm file left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.host import (
    HostPuller,
    allocate_shared_kv_caches,
    remove_stale_shared_kv_caches,
    shared_kv_path,
    unlink_shared_kv_caches,
)
from pdserve.transfer.protocol import TransferError

from .conftest import LAYOUT, NUM_BLOCKS, SECRET, T, empty_caches
from .source_process import start_source


def shm_files(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/pdserve-kv-{pid}-*")


def test_allocation_is_one_shared_file_of_all_layers():
    caches = allocate_shared_kv_caches(LAYOUT, 5, "alloc-test")
    try:
        path = shared_kv_path("alloc-test")
        assert os.path.getsize(path) == 5 * LAYOUT.bytes_per_block
        assert [tuple(c.shape) for c in caches] == [LAYOUT.cache_shape(5)] * LAYOUT.num_layers
        assert all(c.dtype == torch.bfloat16 for c in caches)
        caches[2][1, 4] = 3.0
        raw = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
        mapped = raw.view(torch.bfloat16).view(LAYOUT.num_layers, *LAYOUT.cache_shape(5))
        assert torch.equal(mapped[2], caches[2])  # the same memory, seen through the file
    finally:
        assert unlink_shared_kv_caches("alloc-test")
    assert not os.path.exists(shared_kv_path("alloc-test"))
    assert unlink_shared_kv_caches("alloc-test") is False


def test_a_name_in_use_is_refused():
    allocate_shared_kv_caches(LAYOUT, 1, "taken")
    try:
        with pytest.raises(FileExistsError):
            allocate_shared_kv_caches(LAYOUT, 1, "taken")
    finally:
        unlink_shared_kv_caches("taken")


def test_source_shutdown_leaves_no_shm_file():
    proc = start_source(LAYOUT, NUM_BLOCKS, seed=11, shared=True)
    pid = proc.process.pid
    assert len(shm_files(pid)) == 1
    proc.stop()
    assert proc.process.exitcode == 0
    assert shm_files(pid) == []


def test_exit_without_unlink_still_cleans_up():
    code = (
        "from pdserve.transfer.layout import KVLayout\n"
        "from pdserve.transfer.host import allocate_shared_kv_caches as a\n"
        "a(KVLayout('float32', 4, 2, 2, 8), 3, 'atexit-test')\n"
        "import os; print(os.getpid())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shm_files(int(out.stdout)) == []


def test_a_crashed_source_fails_the_pull_and_its_file_is_reaped():
    proc = start_source(LAYOUT, NUM_BLOCKS, seed=12, shared=True)
    pid = proc.process.pid
    proc.call("hold", "r", [1])
    puller = HostPuller(timeout_s=2.0, conns=SourceConnections(SECRET))
    puller.pull(proc.endpoint, "r", [1], [0], empty_caches(LAYOUT, 1),
                lease_token=T)  # maps the file
    os.kill(pid, signal.SIGKILL)
    proc.process.join(5)
    with pytest.raises(TransferError):
        puller.pull(proc.endpoint, "r", [1], [0], empty_caches(LAYOUT, 1), lease_token=T)
    assert len(puller.conns) == 0  # nor its mapping: the dead source's memory is unmapped
    assert len(shm_files(pid)) == 1  # SIGKILL runs no clean-up ...
    assert shared_kv_path("test-12", pid) in remove_stale_shared_kv_caches()
    assert shm_files(pid) == []  # ... until the next engine reaps it
