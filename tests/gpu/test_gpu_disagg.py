"""P/D on GPUs in bf16, real servers behind the router: the tokens of a colocated instance.

Each prompt runs alone, so P's prefill and D's decode see the batches a colocated instance
sees and the tokens should match exactly; the test asserts most prompts match (bf16 near-ties
of random weights are the only excuse) and that every KV pull succeeded.
Skipped without CUDA; the heterogeneous-TP case needs 2 GPUs.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.router.cluster import metric, start_instance, start_router, wait_healthy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_TOKENS = 32
PROMPT_LENS = (5, 37, 300, 1500, 3000)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(10, 32000, (n,), generator=g).tolist() for n in PROMPT_LENS]


def complete(url: str, prompt: list[int]) -> str:
    body = {"prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0.0, "ignore_eos": True}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


@pytest.mark.parametrize("decode_tp", [1, 2])
def test_pd_bf16_tokens_equal_colocated(tmp_path, gpu_llama, tokenizer_folder, decode_tp):
    if torch.cuda.device_count() < decode_tp:
        pytest.skip(f"needs {decode_tp} GPUs")
    flags = ("--model", gpu_llama, "--tokenizer", tokenizer_folder, "--dtype", "bfloat16",
             "--kv-cache-memory", "2GiB", "--max-model-len", "4096")
    colocated = start_instance(tmp_path, "colocated", *flags)
    prefill = start_instance(tmp_path, "prefill", *flags)
    decode = start_instance(tmp_path, "decode", *flags, "--tensor-parallel-size", str(decode_tp))
    procs = [colocated, prefill, decode]
    try:
        wait_healthy(*procs)
        router = start_router(tmp_path, prefill=[prefill], decode=[decode])
        procs.append(router)
        same = [complete(colocated.url, p) == complete(router.url, p) for p in prompts()]
        assert metric(decode.url, "pdserve:kv_pulls_ok_total") == len(PROMPT_LENS)
        assert metric(decode.url, "pdserve:kv_pulls_failed_total") == 0
        print(f"decode TP={decode_tp}: {sum(same)}/{len(same)} prompts equal colocated")
        assert sum(same) >= len(same) - 1, same
    finally:
        for p in procs:
            p.stop()
