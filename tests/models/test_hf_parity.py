"""Our model over a paged KV cache gives transformers' logits for every supported architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pdserve import switches
from pdserve.kernels import cpu_native
from pdserve.models.loader import load_model

TOLERANCE = 1e-4
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so that all three frequency bands occur
}
ARCHITECTURES = {
    "llama3-rope-untied": lambda: LlamaForCausalLM(
        LlamaConfig(**SMALL, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)
    ),
    "llama-tied-mqa": lambda: LlamaForCausalLM(
        LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True)
    ),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2)),
    "qwen3-qknorm-tied": lambda: Qwen3ForCausalLM(
        Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    # HF initialises norms to 1 and biases to 0, which would hide a swapped or missing one
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)


@pytest.fixture(scope="module", params=["plain", "panels"])
def cpu_linears(request):
    """How our CPU linears run: on the plain weights (the suite's default), or, as servers
    run them, steps of up to 64 rows in the C kernel on the weights packed in panels."""
    if request.param == "panels" and cpu_native.native_kernels() is None:
        pytest.skip("no C compiler: the C linears cannot be built")
    return request.param


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def pair(request, cpu_linears, tmp_path_factory):
    """(transformers reference, our model loaded from its save_pretrained folder)."""
    torch.manual_seed(0)
    reference = ARCHITECTURES[request.param]().float().eval()
    _randomize(reference)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as patch:
        linears = dataclasses.replace(switches.SWITCHES, cpu_panels=cpu_linears == "panels")
        patch.setattr(switches, "SWITCHES", linears)
        ours = load_model(str(folder), torch.float32, torch.device("cpu")).model
    packed = [m.panel_weight is not None for m in ours.modules() if hasattr(m, "panel_weight")]
    assert packed and all(packed) == (cpu_linears == "panels") == any(packed)
    return reference, ours


def _reference_logits(reference: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(
        0, SMALL["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def test_loader_reads_the_architecture(pair):
    reference, ours = pair
    assert ours.config.architecture == reference.config.model_type
    assert ours.config.tie_word_embeddings == reference.config.tie_word_embeddings


def test_prefill_logits_match_transformers(pair, paged_cache):
    reference, ours = pair
    ids = _prompt(23, seed=1)
    (logits,) = paged_cache(ours).step([("a", ids)])
    assert _rel_err(logits, _reference_logits(reference, ids)) < TOLERANCE


def test_decode_steps_after_prefill_match_transformers(pair, paged_cache):
    reference, ours = pair
    ids = _prompt(30, seed=2)
    cache = paged_cache(ours)
    steps = [cache.step([("a", ids[:21])])[0][-1]]
    steps += [cache.step([("a", [token])])[0][-1] for token in ids[21:]]
    expected = _reference_logits(reference, ids)[20:]
    assert _rel_err(torch.stack(steps), expected) < TOLERANCE


def test_chunked_prefill_matches_transformers(pair, paged_cache):
    reference, ours = pair
    ids = _prompt(29, seed=3)
    cache = paged_cache(ours)
    chunks = [cache.step([("a", ids[start:end])])[0] for start, end in ((0, 7), (7, 18), (18, 29))]
    assert _rel_err(torch.cat(chunks), _reference_logits(reference, ids)) < TOLERANCE


def test_batch_mixing_decode_and_prefill_matches_transformers(pair, paged_cache):
    reference, ours = pair
    a, b = _prompt(16, seed=4), _prompt(26, seed=5)
    cache = paged_cache(ours)
    cache.step([("a", a[:14])])
    # one step: a decodes one token while b prefills its first chunk, then both continue
    a1, b1 = cache.step([("a", a[14:15]), ("b", b[:13])])
    b2, a2 = cache.step([("b", b[13:]), ("a", a[15:])])
    assert _rel_err(torch.cat([a1, a2]), _reference_logits(reference, a)[14:]) < TOLERANCE
    assert _rel_err(torch.cat([b1, b2]), _reference_logits(reference, b)) < TOLERANCE
