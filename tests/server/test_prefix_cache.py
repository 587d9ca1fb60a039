"""A request sharing a long prefix with an earlier one reuses its KV blocks, reports them in
`cached_tokens`, and produces the same output as when computed from scratch."""

from __future__ import annotations

import uuid

from server_helpers import GREEDY, complete

BLOCK_SIZE = 16  # the server's default --block-size


def test_shared_prefix_is_reused_and_output_is_unchanged(client, tokenizer):
    nonce = uuid.uuid4().hex  # no earlier test can have cached this prefix
    prefix = f"Document {nonce}. " + "The quick brown fox jumps over the lazy dog. " * 12
    prefix_len = len(tokenizer(prefix).input_ids)
    question_b = prefix + "Question: what does the fox do? Answer:"

    cold = complete(client, question_b, max_tokens=8, **GREEDY)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    other = complete(client, prefix + "Question: what colour is the fox? Answer:",
                     max_tokens=2, **GREEDY)
    cached = other["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= (prefix_len // BLOCK_SIZE - 1) * BLOCK_SIZE
    assert cached % BLOCK_SIZE == 0

    warm = complete(client, question_b, max_tokens=8, **GREEDY)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
