"""Choosing a transport, kv_transfer_params, and KVPuller across TP layouts."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.transfer.host import local_host_id
from pdserve.transfer.layout import IncompatibleLayout, KVLayout
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.transports import KVPuller, choose_transport

from .conftest import LAYOUT, NUM_BLOCKS, SECRET, empty_caches
from .source_process import random_caches, start_source

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
HERE = local_host_id()


@pytest.mark.parametrize(
    "host_id,offered,device,expected",
    [
        (HERE, ["cuda_ipc", "tcp"], GPU, "cuda_ipc"),
        (HERE, ["host", "tcp"], CPU, "host"),
        (HERE, ["host", "tcp"], GPU, "host"),  # CPU P, GPU D: map and upload
        (HERE, ["cuda_ipc", "tcp"], CPU, "tcp"),
        (HERE, ["cuda_ipc", "host", "tcp"], CPU, "host"),  # GPU P staging, CPU D
        (HERE, ["tcp"], CPU, "tcp"),
        ("elsewhere/boot", ["cuda_ipc", "tcp"], GPU, "tcp"),
        ("elsewhere/boot", ["host", "tcp"], CPU, "tcp"),
    ],
)
def test_choose_transport(host_id, offered, device, expected):
    endpoint = {"host_id": host_id, "transports": offered, "gpu_uuid": "GPU-p"}
    assert choose_transport(endpoint, device) == expected


def test_a_host_id_set_per_instance_makes_peers_on_one_machine_use_tcp(monkeypatch):
    from dataclasses import replace

    from pdserve import switches

    endpoint = {"host_id": HERE, "transports": ["host", "tcp"]}
    monkeypatch.setattr(switches, "SWITCHES", replace(switches.SWITCHES, host_id="node-d"))
    assert local_host_id() == "node-d"
    assert choose_transport(endpoint, CPU) == "tcp"
    assert choose_transport({**endpoint, "host_id": "node-d"}, CPU) == "host"


def test_cuda_ipc_needs_peer_access_to_a_visible_gpu(monkeypatch):
    from pdserve.transfer import cuda_ipc

    uuids = {0: "GPU-d", 1: "GPU-p"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda_ipc, "gpu_uuid", lambda d: uuids[d.index])
    endpoint = {"host_id": HERE, "transports": ["cuda_ipc", "tcp"], "gpu_uuid": "GPU-p"}
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: False)
    assert choose_transport(endpoint, GPU) == "tcp"
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    assert choose_transport(endpoint, GPU) == "cuda_ipc"
    assert choose_transport({**endpoint, "gpu_uuid": "GPU-d"}, GPU) == "cuda_ipc"  # same GPU


def test_a_forced_transport_must_be_offered():
    endpoint = {"host_id": HERE, "transports": ["host", "tcp"]}
    assert choose_transport(endpoint, CPU, prefer="tcp") == "tcp"
    with pytest.raises(TransferError):
        choose_transport(endpoint, CPU, prefer="cuda_ipc")


def remote_kv(source, request_id: str, block_ids: list[int], layout: KVLayout,
              token: str = "a-token") -> RemoteKV:
    return RemoteKV("prefill-0", request_id, block_ids, layout, source.endpoints, token)


def test_kv_transfer_params_keep_vllm_fields_and_round_trip(source):
    remote = remote_kv(source, "r-params", [4, 1, 9], LAYOUT)
    params = json.loads(json.dumps(remote.to_kv_transfer_params()))
    assert params["do_remote_prefill"] is True
    assert params["remote_engine_id"] == "prefill-0"
    assert params["remote_request_id"] == "r-params"
    assert params["remote_block_ids"] == [4, 1, 9]
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", source.endpoint["port"])
    assert RemoteKV.from_kv_transfer_params(params) == remote


def test_params_without_pdserve_fields_are_rejected():
    with pytest.raises(ValueError):
        RemoteKV.from_kv_transfer_params({"do_remote_prefill": True, "remote_block_ids": [1]})


@pytest.mark.parametrize("transport", [None, "tcp"])
def test_puller_pulls_a_request_then_releases_it(source, remote_caches, transport):
    rid = f"r-whole-{transport}"
    source.call("expire")
    token = source.call("hold", rid, [7, 3, 20])
    remote = RemoteKV.from_kv_transfer_params(
        remote_kv(source, rid, [7, 3, 20], LAYOUT, token).to_kv_transfer_params()
    )
    local = empty_caches(LAYOUT, 8)
    puller = KVPuller(LAYOUT, local, transport=transport, secret=SECRET)
    stats = puller.pull(remote, [5, 1], first_block=1)  # D's prefix cache has block 0
    assert stats.transport == (transport or "host")
    for mine, theirs in zip(local, remote_caches):
        assert torch.equal(mine[:, [5, 1]], theirs[:, [3, 20]])
    assert puller.release(remote)
    assert sorted(source.call("expire")) == [3, 7, 20]
    puller.close()


def test_decode_tp2_pulls_its_half_of_a_tp1_prefill(source, remote_caches):
    rid = "r-tp2"
    token = source.call("hold", rid, [10, 12])
    remote = remote_kv(source, rid, [10, 12], LAYOUT, token)
    for rank in range(2):
        layout = KVLayout(**{**LAYOUT.to_dict(), "tp_size": 2, "tp_rank": rank})
        local = empty_caches(layout, 3)
        KVPuller(layout, local, secret=SECRET).pull(remote, [2, 0])
        lo, hi = layout.heads
        for mine, theirs in zip(local, remote_caches):
            assert torch.equal(mine[:, [2, 0]], theirs[:, [10, 12], :, lo:hi])


def test_decode_tp1_pulls_from_both_ranks_of_a_tp2_prefill():
    p_layout = KVLayout(**{**LAYOUT.to_dict(), "tp_size": 2})
    proc = start_source(p_layout, NUM_BLOCKS, seed=30, shared=True)
    try:
        token = proc.call("hold", "r", [5, 6])
        remote = remote_kv(proc, "r", [5, 6], p_layout, token)
        local = empty_caches(LAYOUT, 2)
        stats = KVPuller(LAYOUT, local, secret=SECRET).pull(remote, [1, 0])
        assert stats.bytes == 2 * LAYOUT.bytes_per_block
        ranks = [random_caches(p_layout.for_rank(r), NUM_BLOCKS, 30 + r) for r in range(2)]
        for layer, mine in enumerate(local):
            expected = torch.cat([ranks[0][layer], ranks[1][layer]], dim=3)[:, [5, 6]]
            assert torch.equal(mine[:, [1, 0]], expected)
    finally:
        proc.stop()


def test_incompatible_layouts_are_refused_before_any_transfer(source):
    other = KVLayout(**{**LAYOUT.to_dict(), "block_size": 8})
    remote = remote_kv(source, "r-none", [1], LAYOUT)
    with pytest.raises(IncompatibleLayout):
        KVPuller(other, empty_caches(other, 1), secret=SECRET).pull(remote, [0])


def test_a_failing_transport_falls_back_to_the_next_and_is_not_retried(
    source, remote_caches, monkeypatch
):
    from pdserve.transfer import host

    calls = []

    def refuse(*args, **kwargs):  # e.g. CUDA IPC into a process that cannot see P's GPU
        calls.append(1)
        raise TransferError("shared memory not reachable")

    monkeypatch.setattr(host.HostPuller, "pull", refuse)
    rid = "r-fallback"
    source.call("expire")
    token = source.call("hold", rid, [4, 9])
    remote = remote_kv(source, rid, [4, 9], LAYOUT, token)
    local = empty_caches(LAYOUT, 8)
    puller = KVPuller(LAYOUT, local, secret=SECRET)
    assert puller.pull(remote, [2, 6]).transport == "tcp"
    assert puller.pull(remote, [3, 7]).transport == "tcp"
    assert len(calls) == 1  # the broken transport is not tried again for this source
    for mine, theirs in zip(local, remote_caches):
        assert torch.equal(mine[:, [2, 6]], theirs[:, [4, 9]])
    puller.release(remote)
    puller.close()
