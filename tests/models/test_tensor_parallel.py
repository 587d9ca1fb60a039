"""Tensor-parallel layers hold the right shards, and TP=2 over gloo gives TP=1's logits."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from pdserve.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
)
from pdserve.models.loader import load_model


def _qkv_shards(tp_size: int, heads: int, kv_heads: int, x: torch.Tensor, full: list):
    outputs = []
    for rank in range(tp_size):
        layer = QKVParallelLinear(8, 2, heads, kv_heads, bias=True, tp_rank=rank, tp_size=tp_size)
        for shard, (weight, bias) in enumerate(full):
            layer.weight_loader(layer.weight, weight, shard)
            layer.weight_loader(layer.bias, bias, shard)
        outputs.append(layer(x).split([layer.num_heads * 2] + [layer.num_kv_heads * 2] * 2, -1))
    return outputs


@pytest.mark.parametrize("tp_size,kv_heads", [(2, 2), (4, 2)], ids=["split", "replicated"])
def test_qkv_ranks_hold_their_heads(tp_size, kv_heads):
    heads, x = 4, torch.randn(3, 8)
    full = [(torch.randn(n * 2, 8), torch.randn(n * 2)) for n in (heads, kv_heads, kv_heads)]
    expected = [x @ w.T + b for w, b in full]
    outputs = _qkv_shards(tp_size, heads, kv_heads, x, full)
    assert torch.allclose(torch.cat([q for q, _, _ in outputs], -1), expected[0], atol=1e-6)
    replicas = max(1, tp_size // kv_heads)
    for index in (1, 2):  # k, v: each distinct head once, replicas identical
        distinct = torch.cat([out[index] for out in outputs[::replicas]], -1)
        assert torch.allclose(distinct, expected[index], atol=1e-6)
        assert all(
            torch.equal(out[index], outputs[r - r % replicas][index])
            for r, out in enumerate(outputs)
        )


def test_column_parallel_packs_gate_and_up_per_rank():
    gate, up, x = torch.randn(6, 4), torch.randn(6, 4), torch.randn(2, 4)
    halves = []
    for rank in range(2):
        layer = ColumnParallelLinear(4, [6, 6], tp_rank=rank, tp_size=2)
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
        halves.append(layer(x).chunk(2, -1))
    assert torch.allclose(torch.cat([g for g, _ in halves], -1), x @ gate.T, atol=1e-6)
    assert torch.allclose(torch.cat([u for _, u in halves], -1), x @ up.T, atol=1e-6)


def test_row_parallel_partial_sums_add_up():
    weight, x = torch.randn(5, 8), torch.randn(3, 8)
    total = torch.zeros(3, 5)
    for rank in range(2):
        layer = RowParallelLinear(8, 5, tp_rank=rank, tp_size=2)
        layer.weight_loader(layer.weight, weight)
        # the layer's own forward would all-reduce; here the sum is done by hand
        total += torch.nn.functional.linear(x[:, rank * 4 : rank * 4 + 4], layer.weight)
    assert torch.allclose(total, x @ weight.T, atol=1e-5)


def test_vocab_shards_cover_an_uneven_vocabulary():
    weight = torch.randn(10, 3)
    shards = []
    for rank in range(4):
        head = ParallelLMHead(10, 3, tp_rank=rank, tp_size=4)
        head.weight_loader(head.weight, weight)
        shards.append(head.weight.data)
    padded = torch.cat(shards)
    assert padded.shape == (12, 3)
    assert torch.equal(padded[:10], weight) and not padded[10:].any()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tp_worker(rank: int, port: int, folder: str, ids: list[int], out: str) -> None:
    import importlib.util
    from pathlib import Path

    # by file: other test folders' conftest modules may come first on sys.path
    spec = importlib.util.spec_from_file_location(
        "models_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["models_conftest"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    PagedCache = module.PagedCache  # noqa: N806

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = load_model(folder, torch.float32, torch.device("cpu"), tp_rank=rank, tp_size=2)
        (logits,) = PagedCache(model.model).step([("a", ids)])
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def test_tp2_over_gloo_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=255,  # odd: the last vocab shard is padded
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # fewer KV heads than ranks: replicated
        tie_word_embeddings=True,
    )
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.1)
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, 255, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    out = str(tmp_path / "logits.pt")
    mp.start_processes(_tp_worker, args=(_free_port(), str(tmp_path), ids, out), nprocs=2)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    ours = torch.load(out)
    assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-4
