"""On a GPU: a grammar's mask applied to CUDA logits forbids exactly what it forbids on the
CPU (xgrammar's CUDA apply, issue #17). Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.engine.grammar import GrammarCompiler, GrammarSpec
from pdserve.engine.grammar_mask import apply_grammar_masks
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                           "n": {"type": "integer"}},
          "required": ["colour", "n"]}


def test_cuda_mask_equals_cpu_mask(tokenizer_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    requests = [Request(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(3)]
    requests[0].grammar = compiler.matcher(spec, [])
    requests[2].grammar = compiler.matcher(spec, tokenizer.encode('{"colour":'))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    on_gpu = logits.cuda()
    apply_grammar_masks(logits, requests)
    apply_grammar_masks(on_gpu, requests)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu().isinf(), logits.isinf())
    assert not logits[1].isinf().any()  # no grammar: untouched
    assert logits[0].isinf().sum() > vocab // 2  # a grammar row forbids most tokens
